"""`python -m phi3lit analyze RUN_OR_SWEEP_DIR`: what LoRA learned, from the saved adapters and the base weights.

The analysis of the LoRA paper (Hu et al. 2021, §7), on the CPU and without data: for every adapted module and
layer (every slice of a fused projection for slice targets such as [q, v]), ‖ΔW‖_F, the spectrum and stable
rank of ΔW = scale · B · A, and its amplification of the base weight W; for a sweep folder (`ablate`'s
`<root>/<sweep>/`), the subspace similarity φ of the adapters' A matrices between ranks (r=8 against r=64 of the
same grid point and seed) and between seeds of one rank. The mathematics, and reading adapters and base weights,
are `phi3lit.tools.analysis.deltas`; this module finds the runs, computes their updates' numbers and writes the reports.

Outputs: `<run>/analysis/` (updates.csv, analysis.md, spectrum.png, modules.png) and the same figures as
TensorBoard images in `<run>/tb/analysis/`; for a sweep, every point's folder gets those, and
`<sweep>/analysis/` gets analysis.md (per grid point, mean ± std over seeds; φ tables), similarity heatmaps
(`phi_ranks__*.png`, `phi_seeds__*.png`) and TensorBoard images in `<sweep>/analysis/tb/`.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from phi3lit.errors import ConfigError
from phi3lit.model.adapter import read_adapter_config
from phi3lit.savedrun import SavedRun
from phi3lit.tools.analysis.deltas import (
    BaseWeights,
    Update,
    check_scales,
    damaged,
    first_line,
    load_updates,
    subspace_similarity,
    update_metrics,
)
from phi3lit.tools.analysis.figures import (
    kind_order,
    modules_figure,
    phi_figure,
    save_figures,
    spectrum_figure,
    tensorboard_images,
)
from phi3lit.tools.sweep.stats import seed_stats, stat_cell

UPDATE_COLUMNS = [
    "layer", "kind", "r", "scale", "dW_fro", "W_fro", "dW_rel", "sigma_1", "stable_rank", "UtWV_fro",
    "amplification", "UtWV_fro_random",
]  # fmt: skip


# ---------------------------------------------------------------------------- one run
@dataclass
class Run:
    folder: Path  # the run folder (or a bare adapter folder)
    adapter: Path
    out: Path
    config: SavedRun  # the run's resolved config.yaml (empty for a bare adapter)
    updates: list[Update]
    adapter_config: dict

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def seed(self):
        m = re.search(r"(?:^|__)seed=([^_]+)", self.name)
        return self.config.seed if self.config.seed is not None else (m.group(1) if m else None)

    @property
    def rank(self) -> int | None:
        r = self.config.lora_rank
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
    """A run (or bare adapter) folder's updates with their metrics; `bases` caches BaseWeights by model name."""
    adapter = find_adapter(folder)
    run_folder = adapter.parent if adapter == folder and (folder.parent / "config.yaml").is_file() else folder
    config = SavedRun.read(run_folder, strict=True)
    cfg = read_adapter_config(str(adapter), "analyze:")
    check_scales(cfg, adapter / "adapter_config.json")
    name = base or cfg.get("base_model_name_or_path") or ""
    if name not in bases:
        bases[name] = BaseWeights(cfg.get("base_model_name_or_path") or "", base)
    weights = bases[name]
    targets = config.lora_targets
    tensors = adapter / "adapter_model.safetensors"
    try:
        updates, _ = load_updates(adapter, targets, weights.model_config(), adapter_config=cfg)
    except damaged() as e:
        raise ConfigError(
            f"analyze: {tensors}: cannot read the adapter's tensors ({first_line(e)}); re-export it from its run's "
            "checkpoint (phi3lit export) or move it away"
        ) from None
    if not updates:
        raise ConfigError(f"analyze: {adapter}: the adapter holds no LoRA A/B tensors")
    for i, u in enumerate(updates):
        w = weights.get(u.weight_key)
        if w is not None and u.rows is not None:
            w = w[u.rows[0] : u.rows[1]]
        try:
            u.metrics = update_metrics(u.b, u.a, u.scale, w, seed=i)
        except damaged() as e:  # A and B that do not multiply, or an update that does not fit its base weight
            raise ConfigError(
                f"analyze: {tensors}: the update of {u.weight_key} does not fit its LoRA pair or the base weight "
                f"({first_line(e)}); is the adapter damaged, or for another base (--base)?"
            ) from None
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


def sweep_markdown(folder: Path, runs: list[Run], comps: list[dict]) -> list[str]:
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
    figures = {comparison_file(c): phi_figure(c, comparison_title(c)) for c in comps if c["phi"]}
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
def analyze(folder: str, base: str | None = None) -> int:
    """What LoRA learned (Hu et al. 2021, §7): spectra, stable rank, amplification and subspace similarity of saved
    adapters, from the adapters and the base weights, on the CPU, without data.

    Args:
        folder: a run folder (<run>/adapter/), an adapter folder, or an ablate sweep folder.
        base: the base model folder, instead of the adapter's base_model_name_or_path.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"analyze: {folder}: no such folder (a run folder, an adapter folder or a sweep folder)")
    with torch.no_grad():  # weights are only read; the caller's grad mode (a notebook's) is left as it was
        return _analyze(folder, base)


def _analyze(folder: Path, base: str | None) -> int:
    bases: dict = {}
    if find_adapter(folder) is not None:
        run = load_run(folder, base, bases)
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
        run = load_run(p, base, bases)
        write_run(run)
        print(f"[analyze] {run.name}: {len(run.updates)} updates, {run.out}", flush=True)
        runs.append(run)
    written = analyze_sweep(folder, runs)
    print(f"[analyze] sweep {folder.name}: {len(runs)} runs; {', '.join(map(str, written))}", flush=True)
    return 0
