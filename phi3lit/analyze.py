"""`python -m phi3lit analyze RUN_OR_SWEEP_DIR`: what LoRA learned, from the saved adapters and the base weights.

The analysis of the LoRA paper (Hu et al. 2021, §7), on the CPU and without data. For every adapted module and
layer (every slice of a fused projection for slice targets such as [q, v]), with ΔW = scale · B · A:

- ‖ΔW‖_F, the singular values of ΔW (its spectrum) and its stable rank ‖ΔW‖_F² / ‖ΔW‖_2²;
- the amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F, where U, V are the left and right singular vectors of ΔW (its r
  directions) and W the base weight: how much ΔW amplifies directions that W itself barely uses. Beside it,
  ‖Uᵀ W V‖_F for random orthonormal U, V of the same size (the paper's "random" column).

For a sweep folder (`ablate`'s `<root>/<sweep>/`), it also compares the adapters' subspaces with the normalised
subspace similarity of §7,

    φ(A₁, A₂, i, j) = ‖U₁ⁱᵀ U₂ʲ‖_F² / min(i, j)   ∈ [0, 1],

where U₁ⁱ are the top-i right-singular vectors of A₁ (LoRA's r × in matrix): between ranks (r=8 against r=64 of
the same grid point and seed) and between seeds of one rank. 1 means the top-i directions of one lie in the
top-j of the other, 0 that they are orthogonal; two random subspaces of dimensions i and j in d dimensions give
about max(i, j) / d.

Outputs: `<run>/analysis/` (updates.csv, analysis.md, spectrum.png, modules.png) and the same figures as
TensorBoard images in `<run>/tb/analysis/`; for a sweep, every point's folder gets those, and
`<sweep>/analysis/` gets analysis.md (per grid point, mean ± std over seeds; φ tables), similarity heatmaps
(`phi_ranks__*.png`, `phi_seeds__*.png`) and TensorBoard images in `<sweep>/analysis/tb/`.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from phi3lit.errors import ConfigError

ADAPTER_PREFIX = "base_model.model."  # peft's prefix before the base model's own parameter names
LAYER = re.compile(r"\.layers\.(\d+)\.")
UPDATE_COLUMNS = [
    "layer", "kind", "r", "scale", "dW_fro", "W_fro", "dW_rel", "sigma_1", "stable_rank", "UtWV_fro",
    "amplification", "UtWV_fro_random",
]  # fmt: skip


# ---------------------------------------------------------------------------- the mathematics
def lowrank_svd(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0):
    """The thin SVD of ΔW = scale · B · A (B: out x r, A: r x in) without forming ΔW: U (out x k), S (k), V (in x k).

    With B = Q_B R_B and Aᵀ = Q_A R_A, ΔW = Q_B (scale R_B R_Aᵀ) Q_Aᵀ, so the SVD of the small middle matrix gives
    ΔW's: O((out + in) r²) instead of O(out · in · r). Computed in float64.
    """
    b, a = b.detach().double().cpu(), a.detach().double().cpu()
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    um, s, vmh = torch.linalg.svd(scale * rb @ ra.T, full_matrices=False)
    return qb @ um, s, qa @ vmh.T


def right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """The right-singular vectors of A (r x in), as columns (in x r), by decreasing singular value."""
    _, _, vh = torch.linalg.svd(a.detach().double().cpu(), full_matrices=False)
    return vh.T


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """φ(A₁, A₂, i, j) for every i ≤ r₁, j ≤ r₂, as an r₁ x r₂ matrix (entry [i-1, j-1]).

    ‖U₁ⁱᵀ U₂ʲ‖_F² is the sum of the squared entries of the top-left i x j block of G = U₁ᵀ U₂, so one matrix
    product and a 2-d cumulative sum give all of them.
    """
    g = right_singular_vectors(a1).T @ right_singular_vectors(a2)
    overlap = (g**2).cumsum(0).cumsum(1)
    i = torch.arange(1, g.shape[0] + 1, dtype=g.dtype)[:, None]
    j = torch.arange(1, g.shape[1] + 1, dtype=g.dtype)[None, :]
    return overlap / torch.minimum(i, j)


def phi(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> float:
    """The normalised subspace similarity φ(A₁, A₂, i, j) of Hu et al. 2021, §7 (equation 4)."""
    return float(subspace_similarity(a1, a2)[i - 1, j - 1])


def random_orthonormal(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return q


def update_metrics(b: torch.Tensor, a: torch.Tensor, scale: float, w: torch.Tensor | None, seed: int = 0) -> dict:
    """‖ΔW‖_F, spectrum, stable rank and (given the base weight W) the §7 amplification of ΔW = scale · B · A."""
    u, s, v = lowrank_svd(b, a, scale)
    fro = float(torch.linalg.vector_norm(s))
    out = {"dW_fro": fro, "spectrum": s.tolist(), "sigma_1": float(s[0]) if len(s) else 0.0}
    out["stable_rank"] = fro**2 / float(s[0]) ** 2 if fro > 0 else 0.0
    out |= {"W_fro": None, "dW_rel": None, "UtWV_fro": None, "amplification": None, "UtWV_fro_random": None}
    if w is None:
        return out
    w = w.detach().double().cpu()
    w_fro = float(torch.linalg.matrix_norm(w))
    keep = s > s[0] * 1e-10 if fro > 0 else torch.zeros_like(s, dtype=torch.bool)
    out["W_fro"], out["dW_rel"] = w_fro, fro / w_fro if w_fro else None
    k = int(keep.sum())
    if k:
        uwv = float(torch.linalg.matrix_norm(u[:, keep].T @ w @ v[:, keep]))
        out["UtWV_fro"] = uwv
        out["amplification"] = fro / uwv if uwv else math.inf
        gen = torch.Generator().manual_seed(seed)
        ur, vr = random_orthonormal(w.shape[0], k, gen), random_orthonormal(w.shape[1], k, gen)
        out["UtWV_fro_random"] = float(torch.linalg.matrix_norm(ur.T @ w @ vr))
    return out


def lora_delta_norms(model: torch.nn.Module, adapter: str = "default", per_layer: bool = True) -> dict[str, float]:
    """‖scale · B · A‖_F of every LoRA update of a (peft) model, for logging during training.

    Keys: `lora_norm/<kind>` (the root of the sum of squares over layers, i.e. ‖ΔW‖_F of all that kind's updates
    together) and, with `per_layer`, `lora_norm/<kind>/layer_<i>`. `kind` is the module (qkv_proj, o_proj, ...)
    or, for slice targets, the slice (q, v, gate, ...). Computed without forming ΔW: ‖BA‖_F² =
    sum((BᵀB) ⊙ (AAᵀ)), two r x r products; one device-to-host copy for all modules. DoRA's magnitude vector is
    not included; under FSDP or DeepSpeed ZeRO-3 the parameters are shards and the numbers are not meaningful.
    """
    config = getattr(model, "config", None)
    names, squares = [], []
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if not isinstance(scaling, dict) or adapter not in scaling:
            continue
        if adapter in getattr(module, "lora_A", {}):
            a, b_mod = module.lora_A[adapter].weight, module.lora_B[adapter]
            b = b_mod.weight
        elif adapter in getattr(module, "lora_embedding_A", {}):
            a, b, b_mod = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter], None
        else:
            continue
        kind = name.rsplit(".", 1)[-1]
        layer = LAYER.search(name + ".")
        mask = getattr(b_mod, "slice_mask", None)
        parts = mask_slices(mask, kind, config) if mask is not None else [(kind, slice(None), slice(None))]
        with torch.no_grad():
            for part, rows, cols in parts:
                bb, aa = b[rows, cols].float(), a[cols].float()
                squares.append(scaling[adapter] ** 2 * ((bb.T @ bb) * (aa @ aa.T)).sum())
                names.append((part, int(layer.group(1)) if layer else None))
    if not squares:
        return {}
    values = torch.stack(squares).clamp_min(0).tolist()
    out: dict[str, float] = {}
    for (kind, layer), sq in zip(names, values, strict=True):
        out[f"lora_norm/{kind}"] = out.get(f"lora_norm/{kind}", 0.0) + sq
        if per_layer and layer is not None:
            out[f"lora_norm/{kind}/layer_{layer}"] = out.get(f"lora_norm/{kind}/layer_{layer}", 0.0) + sq
    return {k: math.sqrt(v) for k, v in out.items()}


def mask_slices(mask: torch.Tensor, kind: str, config) -> list[tuple[str, slice, slice]]:
    """The (slice name, rows, columns) blocks of a sliced LoRA B, read from its slice mask (phi3lit.lora)."""
    from phi3lit.lora import slice_rows

    try:
        names = {rows: s for s, rows in slice_rows(config, kind).items()}
    except (KeyError, AttributeError, TypeError):
        names = {}
    rows_on = mask.any(1).tolist()
    parts, lo = [], None
    for i, on in enumerate([*rows_on, False]):
        if on and lo is None:
            lo = i
        elif not on and lo is not None:
            cols = mask[lo].nonzero().flatten()
            c0, c1 = int(cols.min()), int(cols.max()) + 1
            parts.append((names.get((lo, i), f"{kind}[{lo}:{i}]"), slice(lo, i), slice(c0, c1)))
            lo = None
    return parts


# ---------------------------------------------------------------------------- adapters and base weights
@dataclass
class Update:
    """One low-rank update: a whole module, or one slice of a fused projection (its rows of W, its r columns)."""

    layer: int | None
    kind: str  # q, k, v, gate, up for slices; qkv_proj, o_proj, gate_up_proj, down_proj, lm_head, ... for modules
    weight_key: str  # the base weight in the model's state dict
    scale: float
    a: torch.Tensor  # r x in
    b: torch.Tensor  # out x r (the slice's rows only)
    rows: tuple[int, int] | None = None  # rows of the fused weight, for slices
    transpose: bool = False  # embeddings: peft stores A as r x vocab, and ΔW = (B A)ᵀ; a and b are swapped here
    metrics: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def key(self) -> tuple:
        return (-1 if self.layer is None else self.layer, self.kind)


def load_updates(adapter_dir: Path, targets: list[str] | None = None, model_config=None) -> tuple[list[Update], dict]:
    """The updates of a peft adapter folder, and its adapter_config.

    Slice targets are split per slice: from `targets` (the run's `model.lora.targets`) when given, else from the
    adapter itself (a fused module whose B is zero outside some slices' rows, in blocks of columns).
    """
    from safetensors.torch import load_file

    from phi3lit.export import lora_pairs, peft_scale
    from phi3lit.lora import FUSED, read_adapter_config, resolve_targets, slice_rows

    cfg = read_adapter_config(str(adapter_dir), "analyze:")
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    plan = resolve_targets(targets) if targets else None
    updates = []
    for prefix, (a, b) in sorted(lora_pairs(tensors).items()):
        kind = prefix.rsplit(".", 1)[-1]
        layer = LAYER.search(prefix + ".")
        layer = int(layer.group(1)) if layer else None
        weight_key = prefix.removeprefix(ADAPTER_PREFIX) + ".weight"
        scale = peft_scale(cfg, prefix)
        a, b = a.float(), b.float()
        if f"{prefix}.lora_embedding_A" in tensors:  # ΔW (vocab x dim) = (B A)ᵀ = Aᵀ Bᵀ
            updates.append(Update(layer, kind, weight_key, scale, a=b.T, b=a.T, transpose=True))
            continue
        if kind in FUSED and model_config is not None:
            rows = slice_rows(model_config, kind)
            enabled = plan.get(kind) if plan is not None else detect_slices(b, rows, FUSED[kind])
            if enabled:
                r = a.shape[0] // len(enabled)
                for j, s in enumerate(enabled):
                    lo, hi = rows[s]
                    cols = slice(j * r, (j + 1) * r)
                    updates.append(Update(layer, s, weight_key, scale, a[cols], b[lo:hi, cols], rows=(lo, hi)))
                continue
        updates.append(Update(layer, kind, weight_key, scale, a, b))
    return updates, cfg


def detect_slices(b: torch.Tensor, rows: dict[str, tuple[int, int]], order: tuple[str, ...]) -> tuple | None:
    """The enabled slices of a sliced fused module, read from B: k slices with non-zero rows, each non-zero only in
    its own block of R/k columns, in order. None for a whole module (or a B that is all zero: nothing to split)."""
    on = tuple(s for s in order if b[slice(*rows[s])].abs().sum() > 0)
    if not on or len(on) == len(order) or b.shape[1] % len(on):
        return None
    r = b.shape[1] // len(on)
    for j, s in enumerate(on):
        block = b[slice(*rows[s])].clone()
        block[:, j * r : (j + 1) * r] = 0
        if block.abs().sum() > 0:
            return None
    return on


class BaseWeights:
    """The base model's weights, read one tensor at a time from its safetensors files (a 7.6 GB base never needs
    to be in memory at once), and its config."""

    def __init__(self, name: str, override: str | None = None):
        from phi3lit.tiny import resolve_pretrained

        source = override or name
        try:
            folder = Path(resolve_pretrained(source)).expanduser()
        except ValueError as e:
            raise ConfigError(f"analyze: base model {source!r}: {e}") from None
        if not folder.is_dir():
            folder = self._hub(source)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"analyze: base model {source!r}: no config.json in {folder}; pass --base DIR")
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), "pt") as f:
                    self.files |= dict.fromkeys(f.keys(), path)
        if not self.files:
            raise ConfigError(f"analyze: base model {source!r}: no *.safetensors weights in {folder}; pass --base DIR")

    @staticmethod
    def _hub(name: str) -> Path:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as e:  # not a hub id, no network, not cached
            first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise ConfigError(
                f"analyze: base model {name!r}: not a local folder and not loadable from the hub ({first}); "
                "pass --base DIR (a folder with config.json and *.safetensors)"
            ) from None

    def model_config(self) -> SimpleNamespace:
        return SimpleNamespace(**self.config)

    def get(self, key: str) -> torch.Tensor | None:
        from safetensors import safe_open

        if key not in self.files and key == "lm_head.weight" and self.config.get("tie_word_embeddings"):
            key = "model.embed_tokens.weight"  # tied (Phi-4-mini): the output projection is the embedding matrix
        if key not in self.files:
            return None
        with safe_open(str(self.files[key]), "pt") as f:
            return f.get_tensor(key)


# ---------------------------------------------------------------------------- one run
@dataclass
class Run:
    folder: Path  # the run folder (or a bare adapter folder)
    adapter: Path
    out: Path
    config: dict  # the run's resolved config.yaml ({} for a bare adapter)
    updates: list[Update]
    adapter_config: dict

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def seed(self):
        m = re.search(r"(?:^|__)seed=([^_]+)", self.name)
        return self.config.get("seed_everything", m.group(1) if m else None)

    @property
    def rank(self) -> int | None:
        r = (self.config.get("model") or {}).get("lora", {}).get("r")
        return r if r is not None else (min(u.rank for u in self.updates) if self.updates else None)

    @property
    def group(self) -> str:
        """The grid point without rank and seed: which runs to compare between ranks (and, with r, seeds)."""
        parts = [p for p in self.name.split("__") if not p.startswith(("r=", "seed="))]
        return "__".join(parts)


def find_adapter(folder: Path) -> Path | None:
    if (folder / "adapter_config.json").is_file():
        return folder
    if (folder / "adapter" / "adapter_config.json").is_file():
        return folder / "adapter"
    return None


def load_run(folder: Path, base: str | None, bases: dict, out: Path | None = None) -> Run:
    import yaml

    adapter = find_adapter(folder)
    run_folder = adapter.parent if adapter == folder and (folder.parent / "config.yaml").is_file() else folder
    try:
        config = yaml.safe_load((run_folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    name = base or cfg.get("base_model_name_or_path") or ""
    if name not in bases:
        bases[name] = BaseWeights(cfg.get("base_model_name_or_path") or "", base)
    weights = bases[name]
    targets = ((config.get("model") or {}).get("lora") or {}).get("targets")
    updates, cfg = load_updates(adapter, [targets] if isinstance(targets, str) else targets, weights.model_config())
    if not updates:
        raise ConfigError(f"analyze: {adapter}: the adapter holds no LoRA A/B tensors")
    for i, u in enumerate(updates):
        w = weights.get(u.weight_key)
        if w is not None and u.rows is not None:
            w = w[u.rows[0] : u.rows[1]]
        u.metrics = update_metrics(u.b, u.a, u.scale, w, seed=i)
    return Run(run_folder, adapter, out or run_folder / "analysis", config, updates, cfg)


def caveats(cfg: dict) -> list[str]:
    notes = []
    if cfg.get("use_dora"):
        notes.append("DoRA adapter: ΔW here is scale·B·A; the trained magnitude vector is not included.")
    if cfg.get("init_lora_weights") in ("pissa", "olora"):
        notes.append(
            f"{cfg['init_lora_weights']} init: the base was changed at init (W - B₀A₀), so scale·B·A is the adapter's "
            "whole product, not the change from the base, and W below is the original base."
        )
    return notes


def write_run(run: Run) -> list[Path]:
    """updates.csv, analysis.md, spectrum.png and modules.png in the run's analysis folder; TensorBoard images."""
    run.out.mkdir(parents=True, exist_ok=True)
    rows = [update_row(u) for u in run.updates]
    write_csv(run.out / "updates.csv", UPDATE_COLUMNS, rows)
    lines = [f"# What LoRA learned: {run.name}", "", f"Adapter: `{run.adapter}`; base: `{base_name(run)}`.", ""]
    lines += [f"- {note}" for note in caveats(run.adapter_config)]
    lines += ["## Per kind (mean over layers)", "", *kind_table(run.updates), "", "## Per layer and module", ""]
    lines += markdown_table(UPDATE_COLUMNS, rows)
    lines += ["", *DEFINITIONS]
    (run.out / "analysis.md").write_text("\n".join(lines) + "\n")
    figures = {"spectrum": spectrum_figure(run), "modules": modules_figure(run)}
    paths = save_figures(figures, run.out)
    tb = run.folder / "tb" / "analysis" if (run.folder / "tb").is_dir() else run.out / "tb"
    tensorboard_images(figures, tb, prefix="analysis/")
    return [run.out / "updates.csv", run.out / "analysis.md", *paths]


def base_name(run: Run) -> str:
    return run.adapter_config.get("base_model_name_or_path", "?")


def update_row(u: Update) -> dict:
    m = u.metrics
    row = {"layer": "" if u.layer is None else u.layer, "kind": u.kind, "r": u.rank, "scale": round(u.scale, 6)}
    for k in UPDATE_COLUMNS[4:]:
        row[k] = "" if m.get(k) is None else round(m[k], 6)
    return row


DEFINITIONS = [
    "- `dW_fro`: ‖ΔW‖_F of ΔW = scale · B · A (for a slice target, that slice's rows and r columns); `W_fro`: ‖W‖_F "
    "of the base weight (the slice's rows); `dW_rel` = dW_fro / W_fro.",
    "- `sigma_1`: the largest singular value of ΔW; `stable_rank` = ‖ΔW‖_F² / σ₁² (1: one direction dominates; r: "
    "all r directions equally strong).",
    "- `UtWV_fro` = ‖Uᵀ W V‖_F with U, V the singular vectors of ΔW; `amplification` = ‖ΔW‖_F / ‖Uᵀ W V‖_F "
    "(Hu et al. 2021, §7): large when ΔW strengthens directions W barely uses. `UtWV_fro_random`: ‖Uᵀ W V‖_F for "
    "random orthonormal U, V of the same size, for comparison.",
]


def kind_table(updates: list[Update]) -> list[str]:
    from phi3lit.ablate import seed_stats

    kinds = sorted({u.kind for u in updates}, key=kind_order)
    head = ["kind", "layers", "r", "‖ΔW‖_F", "‖ΔW‖/‖W‖", "stable rank", "amplification", "‖UᵀWV‖ (random U, V)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind in kinds:
        us = [u for u in updates if u.kind == kind]

        def mean(metric, us=us):
            st = seed_stats([u.metrics[metric] for u in us if u.metrics.get(metric) is not None])
            return fmt(st["mean"])

        lines.append(
            f"| {kind} | {len(us)} | {us[0].rank} | {mean('dW_fro')} | {mean('dW_rel')} | {mean('stable_rank')} | "
            f"{mean('amplification')} | {mean('UtWV_fro')} ({mean('UtWV_fro_random')}) |"
        )
    return lines


KIND_ORDER = ["q", "k", "v", "qkv_proj", "o_proj", "gate", "up", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"]


def kind_order(kind: str):
    return (KIND_ORDER.index(kind), kind) if kind in KIND_ORDER else (len(KIND_ORDER), kind)


def fmt(value, digits: int = 4) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.{digits}f}"


def markdown_table(columns: list[str], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [fmt(v) if isinstance(v, float) else str(v) for v in (r.get(c, "") for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(text.getvalue())


# ---------------------------------------------------------------------------- figures
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layers_of(updates: list[Update]) -> list[int]:
    return sorted({-1 if u.layer is None else u.layer for u in updates})


def spectrum_figure(run: Run):
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


def modules_figure(run: Run):
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


# ---------------------------------------------------------------------------- a sweep
def compare(run1: Run, run2: Run) -> dict[tuple, torch.Tensor]:
    """φ matrices of the updates the two runs share (same layer and kind)."""
    other = {u.key: u for u in run2.updates}
    return {u.key: subspace_similarity(u.a, other[u.key].a) for u in run1.updates if u.key in other}


def comparisons(runs: list[Run]) -> list[dict]:
    """Between ranks (same grid point otherwise, same seed) and between seeds (same grid point and rank); φ per
    update averaged over the seeds (ranks) or seed pairs (seeds)."""
    out = []
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    for group, members in sorted(groups.items()):
        ranks = sorted({r.rank for r in members if r.rank is not None})
        for r1, r2 in itertools.combinations(ranks, 2):
            pairs = [
                (x, y) for x in members for y in members if x.rank == r1 and y.rank == r2 and str(x.seed) == str(y.seed)
            ]
            if pairs:
                out.append({"what": "ranks", "group": group, "r1": r1, "r2": r2, "pairs": pairs})
        for r in ranks:
            same = sorted((x for x in members if x.rank == r), key=lambda x: str(x.seed))
            pairs = list(itertools.combinations(same, 2))
            if pairs:
                out.append({"what": "seeds", "group": group, "r1": r, "r2": r, "pairs": pairs})
    for c in out:
        mats: dict[tuple, list[torch.Tensor]] = {}
        for x, y in c["pairs"]:
            for key, m in compare(x, y).items():
                mats.setdefault(key, []).append(m)
        c["phi"] = {k: torch.stack(v).mean(0) for k, v in mats.items() if len({tuple(m.shape) for m in v}) == 1}
        first = c["pairs"][0][0]
        c["dims"] = {u.key: u.a.shape[1] for u in first.updates}
    return out


def comparison_title(c: dict) -> str:
    group = c["group"] or "all"
    seeds = sorted({str(x.seed) for pair in c["pairs"] for x in pair})
    if c["what"] == "ranks":
        return f"{group}: r={c['r1']} vs r={c['r2']} (mean over seeds {', '.join(seeds)})"
    return f"{group}: r={c['r1']}, seeds {' vs '.join(seeds)} (mean over {len(c['pairs'])} pairs)"


def comparison_file(c: dict) -> str:
    group = re.sub(r"[^A-Za-z0-9_.=+-]", "_", c["group"] or "all")
    if c["what"] == "ranks":
        return f"phi_ranks__{group}__r{c['r1']}_vs_r{c['r2']}"
    return f"phi_seeds__{group}__r{c['r1']}"


def phi_figure(c: dict):
    """Heatmaps of φ(i, j), rows: kinds, columns: up to three layers (first, middle, last)."""
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
    fig.suptitle(f"φ(i, j): {comparison_title(c)}", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def sweep_markdown(folder: Path, runs: list[Run], comps: list[dict]) -> list[str]:
    from phi3lit.ablate import seed_stats, stat_cell

    lines = [f"# What LoRA learned: sweep {folder.name}", ""]
    lines += [f"{len(runs)} runs; each run's own tables and figures are in `<run>/analysis/`.", ""]
    notes = sorted({n for run in runs for n in caveats(run.adapter_config)})
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["## Update size per grid point", ""]
    lines += [
        "Per grid point and kind: the mean over layers of each run, then mean ± std [95% interval] over its seeds.",
        "",
    ]
    head = ["point", "kind", "r", "scale", "seeds", "‖ΔW‖_F", "stable rank", "amplification"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    points: dict[str, list[Run]] = {}
    for run in runs:
        points.setdefault(re.sub(r"(^|__)seed=[^_]+", "", run.name), []).append(run)
    for point, members in sorted(points.items()):
        kinds = sorted({u.kind for run in members for u in run.updates}, key=kind_order)
        for kind in kinds:
            per_run = {m: [] for m in ("dW_fro", "stable_rank", "amplification")}
            for run in members:
                us = [u for u in run.updates if u.kind == kind]
                for m, values in per_run.items():
                    got = [u.metrics[m] for u in us if u.metrics.get(m) is not None and math.isfinite(u.metrics[m])]
                    if got:
                        values.append(sum(got) / len(got))
            u0 = next(u for u in members[0].updates if u.kind == kind)
            cells = [point or "all", kind, str(u0.rank), fmt(u0.scale), str(len(members))]
            cells += [stat_cell(seed_stats(per_run[m])) for m in per_run]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Subspace similarity φ (Hu et al. 2021, §7)", ""]
    lines += [
        "φ(i, j) = ‖U₁ⁱᵀ U₂ʲ‖_F² / min(i, j), U the right-singular vectors of LoRA's A, averaged over the layers "
        "(and over seeds, or seed pairs). `random` is what two random subspaces give: max(i, j) / d, d the input "
        "width. Heatmaps per layer: the linked figures.",
        "",
    ]
    head = ["comparison", "kind", "layers", "φ(1, 1)", "random", "φ(r₁, r₁)", "random", "φ(r₁, r₂)", "random", "figure"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in comps:
        kinds = sorted({k[1] for k in c["phi"]}, key=kind_order)
        for kind in kinds:
            mats = [m for k, m in c["phi"].items() if k[1] == kind]
            d = next(c["dims"][k] for k in c["phi"] if k[1] == kind)
            r1, r2 = mats[0].shape
            mean = lambda i, j, mats=mats: sum(float(m[i - 1, j - 1]) for m in mats) / len(mats)
            cells = [comparison_title(c), kind, str(len(mats)), fmt(mean(1, 1)), fmt(1 / d)]
            cells += [fmt(mean(r1, r1)), fmt(r1 / d), fmt(mean(r1, r2)), fmt(r2 / d)]
            cells.append(f"[{comparison_file(c)}.png]({comparison_file(c)}.png)")
            lines.append("| " + " | ".join(cells) + " |")
    if not comps:
        lines.append("(no two runs differ only in rank or only in seed)")
    lines += ["", "## Definitions", "", *DEFINITIONS]
    return lines


def analyze_sweep(folder: Path, runs: list[Run]) -> list[Path]:
    out = folder / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    comps = comparisons(runs)
    figures = {comparison_file(c): phi_figure(c) for c in comps if c["phi"]}
    paths = save_figures(figures, out)
    tensorboard_images(figures, out / "tb", prefix="similarity/")
    (out / "analysis.md").write_text("\n".join(sweep_markdown(folder, runs, comps)) + "\n")
    rows = []
    for run in runs:
        for row in (update_row(u) for u in run.updates):
            rows.append({"run": run.name, "seed": run.seed, **row})
    write_csv(out / "updates.csv", ["run", "seed", *UPDATE_COLUMNS], rows)
    return [out / "analysis.md", out / "updates.csv", *paths]


# ---------------------------------------------------------------------------- command
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="phi3lit analyze",
        description="What LoRA learned (Hu et al. 2021, §7): spectra, stable rank, amplification and subspace "
        "similarity of saved adapters, from the adapters and the base weights, on the CPU, without data.",
    )
    parser.add_argument("folder", help="a run folder (<run>/adapter/), an adapter folder, or an ablate sweep folder")
    parser.add_argument("--base", help="the base model folder, instead of the adapter's base_model_name_or_path")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        raise ConfigError(f"analyze: {folder}: no such folder (a run folder, an adapter folder or a sweep folder)")
    torch.set_grad_enabled(False)
    bases: dict = {}
    if find_adapter(folder) is not None:
        run = load_run(folder, args.base, bases)
        written = write_run(run)
        print(f"[analyze] {run.name}: {len(run.updates)} updates; {', '.join(map(str, written))}", flush=True)
        return 0
    members = sorted(p for p in folder.iterdir() if p.is_dir() and find_adapter(p) is not None)
    if not members:
        raise ConfigError(
            f"analyze: {folder}: no adapter here (adapter_config.json), in {folder}/adapter/, or in its sub-folders "
            "(a sweep's points); has the run finished?"
        )
    runs = []
    for p in members:
        run = load_run(p, args.base, bases)
        write_run(run)
        print(f"[analyze] {run.name}: {len(run.updates)} updates, {run.out}", flush=True)
        runs.append(run)
    written = analyze_sweep(folder, runs)
    print(f"[analyze] sweep {folder.name}: {len(runs)} runs; {', '.join(map(str, written))}", flush=True)
    return 0
