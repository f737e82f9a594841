"""A sweep's summary: one row per point from what its run left, statistics over seeds, CSV, Markdown and a plot.

`summarize_point` reads a point's folder: ablate's `status.json`, fit's resolved `config.yaml`, the TensorBoard
scalars (val loss and perplexity, token accuracy, throughput, peak memory), the trainable count fit printed in
`fit.log` and the adapter's size. `summarize` compares the finished points at equal tokens seen (tokens per step
from the resolved config x steps; `phi3lit.tools.sweep.stats.at_equal_tokens`), adds the statistics over seeds
(`phi3lit.tools.sweep.stats.stats_rows`) and writes, in `<root>/<sweep>/`:

- `summary.csv`: every run, one row each (`SUMMARY_COLUMNS` after the grid keys and the seed);
- `summary_stats.csv`: per grid point and metric, the mean, sample std and 95% Student-t interval over seeds;
- `summary.md`: both tables, with notes on what each column means;
- `summary.png`: val loss against the first numeric grid key (the rank when swept), mean ± std over seeds, and
  against the trainable parameter count when points differ in it.

Every file is written beside and renamed into place, so array tasks that summarize at the same time never leave
a half-written one. Rows may also be read back from summary.csv (strings): numbers go through `stats.number`.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from phi3lit.files import atomic_file
from phi3lit.run.events import read_scalars
from phi3lit.savedrun import SavedRun
from phi3lit.tools.sweep.grid import (
    ALPHA_KEY,
    LORA_DEFAULTS,
    RANK_KEY,
    RSLORA_KEY,
    base_value,
    effective_scale,
    point_dir,
    points,
    read_status,
    readable,
    short,
)
from phi3lit.tools.sweep.stats import STAT_METRICS, at_equal_tokens, number, seed_stats, stat_cell, stats_rows

SUMMARY_COLUMNS = [
    "scale", "trainable_params", "adapter_mb", "tokens_seen", "eq_tokens", "eq_val_loss", "eq_measured_at",
    "eq_method", "best_val_loss",
    "final_val_loss", "best_val_ppl", "final_val_ppl", "val_token_acc", "tokens_per_sec", "peak_memory_gb",
    "wall_s", "status",
]  # fmt: skip


# ---------------------------------------------------------------------------- one point
def summarize_point(sweep: dict, point: dict) -> dict:
    """A point's row of summary.csv (grid values, seed, status, metrics) and its val-loss curve by tokens seen."""
    folder = point_dir(sweep, point)
    row = {short(k): readable(v, k) for k, v in point["values"].items()}
    if point["seed"] is not None:
        row["seed"] = point["seed"]
    status = read_status(folder)
    row["status"] = status.get("status", "pending")
    row["wall_s"] = round(status.get("wall_s", 0.0), 1)
    run = SavedRun.read(folder)
    lora = {k: run.get(k, point["overrides"].get(k, base_value(sweep, k))) for k in LORA_DEFAULTS}
    scale = effective_scale(lora[RANK_KEY], lora[ALPHA_KEY], lora[RSLORA_KEY])
    row["scale"] = round(scale, 6) if scale is not None else ""
    tb = folder / "tb"
    scalars = read_scalars(str(tb)) if tb.is_dir() else {}
    values = lambda tag: [v for _, v in scalars.get(tag, [])]
    val_loss, val_ppl = values("val/loss"), values("val/ppl")
    row["best_val_loss"] = round(min(val_loss), 4) if val_loss else ""
    row["final_val_loss"] = round(val_loss[-1], 4) if val_loss else ""
    row["best_val_ppl"] = round(min(val_ppl), 3) if val_ppl else ""
    row["final_val_ppl"] = round(val_ppl[-1], 3) if val_ppl else ""
    for tag in sorted(scalars):  # downstream scores that `eval` logged into the point's run (eval/<task>/<metric>)
        if tag.startswith("eval/") and values(tag):
            row["eval_" + tag.removeprefix("eval/").replace("/", "_")] = round(values(tag)[-1], 4)
    acc = values("val/token_acc")
    row["val_token_acc"] = round(acc[-1], 4) if acc else ""
    # Steady state: the first window carries start-up (model load, first-step allocations, compilation).
    windows = values("train/tokens_per_sec")
    steady = windows[1:] or windows  # a run with a single logged window has only that one
    row["tokens_per_sec"] = round(statistics.median(steady)) if steady else ""
    mem = values("train/peak_memory_gb")
    row["peak_memory_gb"] = round(max(mem), 3) if mem else ""
    row["trainable_params"] = trainable_from_log(folder)
    adapter = folder / "adapter" / "adapter_model.safetensors"
    row["adapter_mb"] = round(adapter.stat().st_size / 1e6, 3) if adapter.exists() else ""
    per_step = run.tokens_per_step
    curve = [(step * per_step, v) for step, v in scalars.get("val/loss", [])] if per_step else []
    row["tokens_seen"] = max(t for t, _ in curve) if curve else ""
    row["_curve"] = curve  # (tokens seen, val loss) at each validation, as logged; not written out
    return row


def trainable_from_log(folder: Path):
    log = folder / "fit.log"
    if not log.exists():
        return ""
    for line in log.read_bytes().decode(errors="replace").splitlines():  # a log may hold any bytes
        if "[phi3lit] trainable params:" in line:  # the effective count phi3lit prints at the start of fit
            return int(line.split("trainable params:")[1].split("||")[0].strip().replace(",", ""))
    return ""


# ---------------------------------------------------------------------------- the sweep
EQ_NOTE = (
    "points compared at equal tokens seen: eq_tokens is the largest token count every finished point reached (the "
    "smallest final tokens_seen); eq_val_loss is each point's val loss at exactly eq_tokens, measured where the point "
    "validated there, else interpolated linearly in tokens between its two validations that bracket eq_tokens "
    "(eq_measured_at says which). Interpolation, rather than validating every point at common token counts, keeps "
    "each point's fit command as written and works for any grid (batch size, accumulation, devices). Points that "
    "differ in data.batch_size score the same validation rows: ablate gives them all one data.val_batch_size"
)
COLUMN_NOTES = {  # written under the table in summary.md, so a reader knows what the numbers are
    "scale": "the effective LoRA update scale of the point: alpha/r, or alpha/sqrt(r) with rsLoRA (per slice for "
    "sliced targets such as [q, v]); from the point's resolved config.yaml",
    "trainable_params": "the effective count fit prints (zero blocks of fused projections excluded)",
    "tokens_seen": "token slots trained on at the last validation: steps x data.batch_size x data.max_length x "
    "accumulation x devices (packed rows, so nearly all slots hold real tokens)",
    "eq_tokens / eq_val_loss": EQ_NOTE,
    "eq_measured_at / eq_method": "the tokens seen at the validation(s) behind eq_val_loss: one count (`measured`: "
    "the point validated at eq_tokens) or `t0..t1` (`interpolated`: linearly in tokens between those two "
    "validations, an estimate); empty when the point has no validation at or before eq_tokens",
    "tokens_per_sec": "steady-state training throughput: the median of the point's logged `train/tokens_per_sec` "
    "windows after the first (which carries start-up costs); the only window if there is one",
    "wall_s": "the point's wall time, resumed attempts included",
}
STATS_NOTE = (
    "Per grid point, over the seeds that finished (n of the runs): mean ± sample standard deviation [95% Student-t "
    "interval of the mean]; one seed gives no spread or interval. Points are ranked by `eq_val_loss`; "
    "**≈** marks a point whose difference from the best is smaller than the seed spread (the larger of the two "
    "standard deviations): the seeds do not tell it from the best."
)


def summarize(sweep: dict) -> Path:
    pts = points(sweep)
    rows = [summarize_point(sweep, p) for p in pts]
    done = {p["name"]: r for p, r in zip(pts, rows, strict=True) if r["status"] == "ok"}
    budget, at_budget, where = at_equal_tokens({name: r["_curve"] for name, r in done.items() if r["_curve"]})
    for p, r in zip(pts, rows, strict=True):
        value = at_budget.get(p["name"]) if p["name"] in done else None
        t0, t1 = where.get(p["name"], (None, None))
        r["eq_tokens"] = int(budget) if budget is not None and value is not None else ""
        r["eq_val_loss"] = round(value, 4) if value is not None else ""
        r["eq_measured_at"] = "" if value is None else f"{int(t0)}" if t0 == t1 else f"{int(t0)}..{int(t1)}"
        r["eq_method"] = "" if value is None else "measured" if t0 == t1 else "interpolated"
    keys = [short(k) for k in sweep["grid"]]
    evals = sorted({k for r in rows for k in r if k.startswith("eval_")})  # columns of the scores eval logged
    stats = stats_rows(keys, rows, [*STAT_METRICS, *evals])
    out = Path(sweep["root"]) / sweep["name"]
    out.mkdir(parents=True, exist_ok=True)
    columns = keys + (["seed"] if pts and pts[0]["seed"] is not None else []) + SUMMARY_COLUMNS + evals
    replace_file(out / "summary.csv", csv_text(columns, rows))
    stat_columns = keys + ["n_ok", "n_runs", "scale", "trainable_params", "eq_tokens"]
    for m in [*STAT_METRICS, *evals]:
        stat_columns += [f"{m}_mean", f"{m}_std", f"{m}_ci95_lo", f"{m}_ci95_hi"]
    stat_columns += ["vs_best", "within_seed_spread"]
    replace_file(out / "summary_stats.csv", csv_text(stat_columns, stats))
    replace_file(out / "summary.md", summary_markdown(sweep, keys, columns, rows, stats).encode())
    fig = summary_figure(sweep, rows)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    replace_file(out / "summary.png", png.getvalue())
    written = ", ".join(str(out / f) for f in ("summary.csv", "summary_stats.csv", "summary.md", "summary.png"))
    print(f"[ablate] summary: {written}", flush=True)
    return out


def csv_text(columns: list[str], rows: list[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def summary_markdown(sweep: dict, keys: list[str], columns: list[str], rows: list[dict], stats: list[dict]) -> str:
    shown = [("eq_val_loss", 4), ("best_val_loss", 4), ("val_token_acc", 4), ("tokens_per_sec", 0)]
    shown += [(c, 4) for c in columns if c.startswith("eval_")]  # downstream scores, with their seed spread
    head = keys + ["scale", "n"] + [m for m, _ in shown] + ["Δ eq_val_loss vs best"]
    lines = ["## Over seeds", "", STATS_NOTE, ""]
    budget = next((r["eq_tokens"] for r in rows if r.get("eq_tokens") not in ("", None)), None)
    if budget is not None:  # what the ranking compares, said where it is read
        estimated = sum(r.get("eq_method") == "interpolated" for r in rows)
        how = f"{estimated} of them interpolated between two validations" if estimated else "all measured there"
        lines += [f"`eq_val_loss`: each point's val loss at {int(budget):,} tokens seen ({how}; `eq_measured_at`).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stats:
        delta = s["vs_best"]
        if delta not in ("", "best"):
            delta = f"{delta:+.4f}" + (" ≈ (within seed spread)" if s["within_seed_spread"] == "yes" else "")
        cells = [str(s[k]) for k in keys] + [str(s["scale"]), f"{s['n_ok']}/{s['n_runs']}"]
        cells += [stat_cell(s[f"_{m}"], d) for m, d in shown] + [str(delta) or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Every run", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    lines += [""] + [f"- `{column}`: {note}" for column, note in COLUMN_NOTES.items()]
    return "\n".join(lines) + "\n"


def replace_file(path: Path, data: bytes) -> None:
    """Write beside, then rename: array tasks that summarize at the same time never leave a half-written file."""
    with atomic_file(path) as f:
        f.write(data)


def summary_figure(sweep: dict, rows: list[dict]):
    """Val loss (at equal tokens when known, else final) against the first numeric grid key (rank if swept), one
    line per other grid value, as the mean over seeds with ± one standard deviation as error bars; beside it,
    val loss against trainable parameters when the points differ in that count. Rows as summarize_point makes
    them or as read back from summary.csv (strings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [short(k) for k in sweep["grid"]]
    metric = "eq_val_loss" if any(number(r.get("eq_val_loss")) is not None for r in rows) else "final_val_loss"
    done = [r for r in rows if r["status"] == "ok" and number(r.get(metric)) is not None]
    numeric = [k for k in keys if all(number(r[k]) is not None for r in done)]
    x_key = "r" if "r" in numeric else (numeric[0] if numeric else keys[0])
    other = [k for k in keys if k != x_key]
    counts = {number(r["trainable_params"]) for r in done} - {None}
    with_params = len(counts) > 1  # one count for every point would be a single column of dots
    fig, axes = plt.subplots(1, 1 + with_params, figsize=(12 if with_params else 6.5, 4.5), squeeze=False)
    ax1 = axes[0][0]
    x = (lambda r: number(r[x_key])) if x_key in numeric else (lambda r: str(r[x_key]))
    groups: dict[str, dict[tuple, list[dict]]] = {}  # line label -> grid point -> its seeds' rows
    for r in done:
        label = ", ".join(str(r[k]) for k in other) or "all"
        groups.setdefault(label, {}).setdefault(tuple(str(r[k]) for k in keys), []).append(r)
    most = max((len(g) for line in groups.values() for g in line.values()), default=1)
    for label, line in sorted(groups.items()):
        seeds = list(line.values())
        if x_key in numeric:
            seeds.sort(key=lambda g: x(g[0]))
        stats = [seed_stats([number(r[metric]) for r in g]) for g in seeds]
        mean = [s["mean"] for s in stats]
        err = [s["std"] or 0.0 for s in stats]
        style = "o-" if x_key in numeric else "o"  # no lines between unordered categories such as target sets
        ax1.errorbar([x(g[0]) for g in seeds], mean, yerr=err, fmt=style, capsize=3, label=label)
        if with_params:
            params = [number(g[0]["trainable_params"]) or math.nan for g in seeds]
            axes[0][1].errorbar(params, mean, yerr=err, fmt="o", capsize=3, label=label)
    if x_key in numeric and x_key.endswith("lr"):
        ax1.set_xscale("log", base=10)  # learning rates are swept over decades: ticks at 1e-4, 1e-3, ...
    elif x_key == "r" and x_key in numeric:
        ax1.set_xscale("log", base=2)  # ranks double: ticks at 4, 8, 16, ...
    what = metric.replace("_", " ") + (f" (mean ± std over up to {most} seeds)" if most > 1 else "")
    ax1.set(xlabel=x_key, ylabel=what, title=f"{sweep['name']}: val loss vs {x_key}")
    if with_params:
        axes[0][1].set_xscale("log")
        axes[0][1].set(xlabel="trainable parameters", ylabel=what, title="val loss vs trainable params")
    for ax in axes[0]:
        if groups and other:  # a single "all" line needs no legend
            ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)  # the caller saves it; nothing is shown
    return fig
