"""The figures of `analyze`: ΔW's spectra, where the adaptation goes, and the subspace similarity φ, as PNG files
and TensorBoard images.

`spectrum_figure` and `modules_figure` draw one run (`analyze.Run`: its `name` and `updates`, each with its
`metrics` from `deltas.update_metrics`); `phi_figure` one comparison of `analyze.comparisons` (φ matrices by
(layer, kind)). matplotlib is imported, with the Agg backend, only when a figure is drawn; figures are closed
after drawing (nothing is shown) and the caller saves them (`save_figures`, `tensorboard_images`).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from phi3lit.tools.analysis.deltas import Update

KIND_ORDER = ["q", "k", "v", "qkv_proj", "o_proj", "gate", "up", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"]


def kind_order(kind: str):
    return (KIND_ORDER.index(kind), kind) if kind in KIND_ORDER else (len(KIND_ORDER), kind)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layers_of(updates: list[Update]) -> list[int]:
    return sorted({-1 if u.layer is None else u.layer for u in updates})


def spectrum_figure(run):
    """The singular values of ΔW, one panel per kind, one line per layer."""
    plt = pyplot()
    kinds = sorted({u.kind for u in run.updates}, key=kind_order)
    cols = min(len(kinds), 4)
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    layers = layers_of(run.updates)
    cmap = plt.get_cmap("viridis")
    for ax, kind in zip(axes.flat, kinds, strict=False):
        for u in (u for u in run.updates if u.kind == kind):
            s = u.metrics["spectrum"]
            pos = layers.index(u.key[0]) / max(len(layers) - 1, 1)
            label = f"layer {u.layer}" if len(layers) <= 8 else None
            ax.semilogy(range(1, len(s) + 1), [max(x, 1e-30) for x in s], "o-", ms=3, color=cmap(pos), label=label)
        ax.set(title=f"{kind}: singular values of ΔW", xlabel="i", ylabel="σ_i")
        if len(layers) <= 8:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    fig.suptitle(f"{run.name}: spectrum of ΔW = scale·B·A per module and layer", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def modules_figure(run):
    """Heatmaps over layers x kinds: ‖ΔW‖_F, stable rank, amplification."""
    plt = pyplot()
    kinds = sorted({u.kind for u in run.updates}, key=kind_order)
    layers = layers_of(run.updates)
    metrics = [("dW_fro", "‖ΔW‖_F"), ("stable_rank", "stable rank"), ("amplification", "amplification ‖ΔW‖/‖UᵀWV‖")]
    height = max(3.0, 0.18 * len(layers) + 1.5)
    fig, axes = plt.subplots(1, 3, figsize=(4.2 * 3, height), squeeze=False)
    for ax, (metric, title) in zip(axes[0], metrics, strict=True):
        grid = torch.full((len(layers), len(kinds)), math.nan)
        for u in run.updates:
            value = u.metrics.get(metric)
            if value is not None and math.isfinite(value):
                grid[layers.index(u.key[0]), kinds.index(u.kind)] = value
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="magma", origin="lower")
        ax.set_xticks(range(len(kinds)), kinds, rotation=45, fontsize=8)
        step = max(1, len(layers) // 12)
        ax.set_yticks(range(0, len(layers), step), [str(x) for x in layers[::step]], fontsize=8)
        ax.set(title=title, xlabel="module", ylabel="layer")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{run.name}: where the adaptation goes", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def save_figures(figures: dict, folder: Path) -> list[Path]:
    paths = []
    for name, fig in figures.items():
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


def tensorboard_images(figures: dict, log_dir: Path, prefix: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    for name, fig in figures.items():
        writer.add_figure(f"{prefix}{name}", fig, global_step=0, close=False)
    writer.close()


def phi_figure(c: dict, title: str):
    """Heatmaps of φ(i, j) of a comparison (`analyze.comparisons`), rows: kinds, columns: up to three layers (first,
    middle, last)."""
    plt = pyplot()
    keys = list(c["phi"])
    kinds = sorted({k[1] for k in keys}, key=kind_order)
    layers = sorted({k[0] for k in keys})
    shown = sorted({layers[0], layers[len(layers) // 2], layers[-1]}) if layers else []
    fig, axes = plt.subplots(len(kinds), len(shown), figsize=(3.6 * len(shown), 3.0 * len(kinds)), squeeze=False)
    for (i, kind), (j, layer) in itertools.product(enumerate(kinds), enumerate(shown)):
        ax = axes[i][j]
        m = c["phi"].get((layer, kind))
        if m is None:
            ax.axis("off")
            continue
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis", origin="upper", aspect="auto")
        r1, r2 = m.shape
        ax.set_xticks(range(0, r2, max(1, r2 // 8)), [str(x + 1) for x in range(0, r2, max(1, r2 // 8))], fontsize=7)
        ax.set_yticks(range(0, r1, max(1, r1 // 8)), [str(x + 1) for x in range(0, r1, max(1, r1 // 8))], fontsize=7)
        ax.set_title(f"layer {layer if layer >= 0 else '-'} {kind}", fontsize=9)
        ax.set(xlabel="j", ylabel="i")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"φ(i, j): {title}", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig
