"""`python -m phi3lit ablate experiments/NAME.yaml`: sweep a grid of config overrides through `fit`.

A sweep file names a base config, a grid of CLI overrides, optional fixed overrides and optional seeds:

    base: configs/tiny.yaml
    grid:
      model.lora.r: [4, 8, 16]
      model.lora.targets: [[q, v], attn, all-linear]
    fixed: {trainer.max_steps: 100}
    seeds: [0, 1]

Every point runs `python -m phi3lit fit` in its own process (the same path as a normal run) with its own run
folder `<root>/<sweep>/<point name>/`, so TensorBoard shows the whole sweep side by side (HPARAMS included).
`status.json` in each folder makes the sweep resumable: finished points are skipped, an interrupted point
resumes from its `last.ckpt`, and a failed point is recorded with its error while the sweep goes on.
`--list` / `--index I` let a scheduler (e.g. a SLURM array) run one point per job; `--dry-run` prints each point's
`python -m phi3lit fit ...` command. `summary.csv`, `summary.md` and `summary.png` collect the results. Exit
status: 0 when every selected point is done, 1 when one failed (after the others ran and the summary was
written), 2 for a bad sweep file or option (a one-line ConfigError).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from phi3lit.errors import ConfigError

SUMMARY_COLUMNS = [
    "trainable_params", "adapter_mb", "best_val_loss", "final_val_loss", "best_val_ppl", "final_val_ppl",
    "val_token_acc", "tokens_per_sec", "peak_memory_gb", "wall_s", "status",
]  # fmt: skip
EXIT_FAILED_POINTS = 1  # some point failed; config errors exit 2 (the CLI's handler), as they do for fit


# ---------------------------------------------------------------------------- points
SWEEP_KEYS = {"base", "grid", "fixed", "seeds", "name", "root"}


def load_sweep(path: str | Path) -> dict:
    """Read and check a sweep file; anything wrong is a one-line ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the sweep file ({e.strerror or e})") from None
    try:
        sweep = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    need = "a sweep needs `base:` (a config file) and `grid:` (key: [values, ...])"
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: {need}; the file holds no mapping")
    unknown = sorted(set(sweep) - SWEEP_KEYS)
    if unknown:  # a typo such as `seed:` would otherwise be silently ignored
        known = ", ".join(sorted(SWEEP_KEYS))
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}; a sweep has {known}")
    missing = [k for k in ("base", "grid") if sweep.get(k) is None]
    if missing:
        raise ConfigError(f"{path}: no `{'` or `'.join(missing)}:`; {need}")
    base = Path(str(sweep["base"]))
    if not base.is_file():  # fit would fail the same way at every point
        where = "" if base.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
        raise ConfigError(f"{path}: base: {base} does not exist{where}")
    grid = sweep["grid"]
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: grid: must map config keys to lists of values, e.g. `model.lora.r: [4, 8]`")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{path}: grid: {key}: must be a non-empty list of values, got {values!r} "
                "(a single value belongs in `fixed:`; a list value is written [[q, v]])"
            )
    shorts = [short(str(k)) for k in grid]
    clash = sorted({s for s in shorts if shorts.count(s) > 1})
    if clash:  # point names and summary columns use the last part of the key
        raise ConfigError(f"{path}: grid: keys ending in the same name ({', '.join(clash)}) cannot be told apart")
    fixed = sweep.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: fixed: must map config keys to values, got {fixed!r}")
    both = sorted(set(fixed) & set(grid))
    if both:
        raise ConfigError(f"{path}: {', '.join(both)} in both `grid:` and `fixed:`; keep one")
    seeds = sweep.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds):
        raise ConfigError(f"{path}: seeds: must be a non-empty list, e.g. [0, 1], got {seeds!r}")
    sweep["fixed"] = fixed
    sweep["seeds"] = seeds or [None]
    sweep["name"] = str(sweep.get("name") or path.stem)
    sweep["root"] = str(sweep.get("root") or "runs/sweeps")
    names = [p["name"] for p in points(sweep)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:  # two points would share one run folder
        raise ConfigError(f"{path}: points with the same name (and folder): {', '.join(dup)}")
    return sweep


def short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def readable(value) -> str:
    if isinstance(value, list | tuple):
        return "+".join(map(str, value))
    return str(value)


def points(sweep: dict) -> list[dict]:
    """Grid x seeds, in a stable order: [{"name", "overrides", "values", "seed"}]."""
    keys = list(sweep["grid"])
    out = []
    for combo in itertools.product(*(sweep["grid"][k] for k in keys)):
        for seed in sweep["seeds"]:
            values = dict(zip(keys, combo, strict=True))
            name = "__".join(f"{short(k)}={readable(v)}" for k, v in values.items())
            if seed is not None:
                name += f"__seed={seed}"
            out.append({"name": name, "values": values, "seed": seed, "overrides": {**sweep["fixed"], **values}})
    return out


def cli_value(value) -> str:
    """A CLI string for a YAML value: lists in flow style, everything else as YAML would print it."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def point_dir(sweep: dict, point: dict) -> Path:
    return Path(sweep["root"]) / sweep["name"] / point["name"]


def fit_args(sweep: dict, point: dict, resume: bool) -> list[str]:
    args = ["fit", "--config", str(sweep["base"]), "--trainer.default_root_dir", str(point_dir(sweep, point))]
    for key, value in point["overrides"].items():
        args += [f"--{key}", cli_value(value)]
    if point["seed"] is not None:
        args += ["--seed_everything", str(point["seed"])]
    if resume:
        args += ["--ckpt_path", "last"]
    return args


def dry_run(sweep: dict, point: dict, index: int) -> str:
    """`# index name (what a run would do)` and the exact fit command, as a user would type it."""
    folder = point_dir(sweep, point)
    state = read_status(folder).get("status", "pending")
    resume = state != "ok" and (folder / "checkpoints" / "last.ckpt").exists()
    note = "done, would be skipped" if state == "ok" else "would resume from last.ckpt" if resume else state
    command = shlex.join(["python", "-m", "phi3lit", *fit_args(sweep, point, resume)])
    return f"# {index} {point['name']} ({note})\n{command}"


# ---------------------------------------------------------------------------- running
def read_status(folder: Path) -> dict:
    try:
        return json.loads((folder / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_status(folder: Path, **status) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "status.json.tmp"
    tmp.write_text(json.dumps(status, indent=2))
    tmp.replace(folder / "status.json")


def run_point(sweep: dict, point: dict, progress: str = "") -> str:
    """Run one point unless it is done: "ok", "failed", or "skipped" (finished before)."""
    folder = point_dir(sweep, point)
    label = f"[ablate] {progress}{' ' if progress else ''}{point['name']}"
    status = read_status(folder)
    if status.get("status") == "ok":
        print(f"{label}: done, skipped", flush=True)
        return "skipped"
    resume = (folder / "checkpoints" / "last.ckpt").exists()
    print(f"{label}: {'resuming' if resume else 'starting'}", flush=True)
    start = time.time()
    spent = status.get("wall_s", 0.0)
    write_status(folder, status="running", wall_s=spent)
    cmd = [sys.executable, "-m", "phi3lit", *fit_args(sweep, point, resume)]
    with open(folder / "fit.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = spent + time.time() - start
    if proc.returncode == 0:
        write_status(folder, status="ok", wall_s=wall)
    else:
        tail = (folder / "fit.log").read_text().strip().splitlines()[-5:]
        write_status(folder, status="failed", wall_s=wall, returncode=proc.returncode, error="\n".join(tail))
    print(result_line(label, summarize_point(sweep, point), proc.returncode, folder), flush=True)  # progress in logs
    return "ok" if proc.returncode == 0 else "failed"


RESULT_KEYS = ["best_val_loss", "final_val_loss", "tokens_per_sec", "wall_s"]


def result_line(label: str, row: dict, returncode: int, folder: Path) -> str:
    """One greppable line per finished point: `<label>: ok  best_val_loss=... final_val_loss=... ...`."""
    values = " ".join(f"{k}={row.get(k) if row.get(k) != '' else '-'}" for k in RESULT_KEYS)
    if returncode == 0:
        return f"{label}: ok  {values}"
    return f"{label}: FAILED (exit {returncode}; see {folder / 'fit.log'})  {values}"


# ---------------------------------------------------------------------------- summary
def summarize_point(sweep: dict, point: dict) -> dict:
    from phi3lit.callbacks import read_scalars

    folder = point_dir(sweep, point)
    row = {short(k): readable(v) for k, v in point["values"].items()}
    if point["seed"] is not None:
        row["seed"] = point["seed"]
    status = read_status(folder)
    row["status"] = status.get("status", "pending")
    row["wall_s"] = round(status.get("wall_s", 0.0), 1)
    tb = folder / "tb"
    scalars = read_scalars(str(tb)) if tb.is_dir() else {}
    values = lambda tag: [v for _, v in scalars.get(tag, [])]
    val_loss, val_ppl = values("val/loss"), values("val/ppl")
    row["best_val_loss"] = round(min(val_loss), 4) if val_loss else ""
    row["final_val_loss"] = round(val_loss[-1], 4) if val_loss else ""
    row["best_val_ppl"] = round(min(val_ppl), 3) if val_ppl else ""
    row["final_val_ppl"] = round(val_ppl[-1], 3) if val_ppl else ""
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
    return row


def trainable_from_log(folder: Path):
    log = folder / "fit.log"
    if not log.exists():
        return ""
    for line in log.read_text().splitlines():
        if "[phi3lit] trainable params:" in line:  # the effective count phi3lit prints at the start of fit
            return int(line.split("trainable params:")[1].split("||")[0].strip().replace(",", ""))
    return ""


COLUMN_NOTES = {  # written under the table in summary.md, so a reader knows what the numbers are
    "trainable_params": "the effective count fit prints (zero blocks of fused projections excluded)",
    "tokens_per_sec": "steady-state training throughput: the median of the point's logged `train/tokens_per_sec` "
    "windows after the first (which carries start-up costs); the only window if there is one",
    "wall_s": "the point's wall time, resumed attempts included",
}


def summarize(sweep: dict) -> Path:
    pts = points(sweep)
    rows = [summarize_point(sweep, p) for p in pts]
    out = Path(sweep["root"]) / sweep["name"]
    out.mkdir(parents=True, exist_ok=True)
    columns = [short(k) for k in sweep["grid"]] + (["seed"] if pts and pts[0]["seed"] is not None else [])
    columns += SUMMARY_COLUMNS
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    replace_file(out / "summary.csv", text.getvalue().encode())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    lines += [""] + [f"- `{column}`: {note}" for column, note in COLUMN_NOTES.items()]
    replace_file(out / "summary.md", ("\n".join(lines) + "\n").encode())
    fig = summary_figure(sweep, rows)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    replace_file(out / "summary.png", png.getvalue())
    print(f"[ablate] summary: {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'summary.png'}", flush=True)
    return out


def replace_file(path: Path, data: bytes) -> None:
    """Write beside, then rename: array tasks that summarize at the same time never leave a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summary_figure(sweep: dict, rows: list[dict]):
    """Final val loss against the first numeric grid key (rank if swept), one line per other grid value; beside
    it, val loss against trainable parameters when the points differ in that count. Rows as summarize_point
    makes them or as read back from summary.csv (strings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [short(k) for k in sweep["grid"]]
    done = [r for r in rows if r["status"] == "ok" and number(r["final_val_loss"]) is not None]
    numeric = [k for k in keys if all(number(r[k]) is not None for r in done)]
    x_key = "r" if "r" in numeric else (numeric[0] if numeric else keys[0])
    other = [k for k in keys if k != x_key]
    counts = {number(r["trainable_params"]) for r in done} - {None}
    with_params = len(counts) > 1  # one count for every point would be a single column of dots
    fig, axes = plt.subplots(1, 1 + with_params, figsize=(12 if with_params else 6.5, 4.5), squeeze=False)
    ax1 = axes[0][0]
    x = (lambda r: number(r[x_key])) if x_key in numeric else (lambda r: str(r[x_key]))
    groups: dict[str, list[dict]] = {}
    for r in done:
        groups.setdefault(", ".join(str(r[k]) for k in other) or "all", []).append(r)
    for label, group in sorted(groups.items()):
        if x_key in numeric:
            group = sorted(group, key=x)
        loss = [number(r["final_val_loss"]) for r in group]
        style = "o-" if x_key in numeric else "o"  # no lines between unordered categories such as target sets
        ax1.plot([x(r) for r in group], loss, style, label=label)
        if with_params:
            axes[0][1].scatter([number(r["trainable_params"]) or math.nan for r in group], loss, label=label)
    if x_key in numeric and x_key.endswith("lr"):
        ax1.set_xscale("log", base=10)  # learning rates are swept over decades: ticks at 1e-4, 1e-3, ...
    elif x_key == "r" and x_key in numeric:
        ax1.set_xscale("log", base=2)  # ranks double: ticks at 4, 8, 16, ...
    ax1.set(xlabel=x_key, ylabel="final val loss", title=f"{sweep['name']}: val loss vs {x_key}")
    if with_params:
        axes[0][1].set_xscale("log")
        axes[0][1].set(xlabel="trainable parameters", ylabel="final val loss", title="val loss vs trainable params")
    for ax in axes[0]:
        if groups and other:  # a single "all" line needs no legend
            ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)  # the caller saves it; nothing is shown
    return fig


# ---------------------------------------------------------------------------- command
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="phi3lit ablate", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="sweep YAML file (see experiments/)")
    parser.add_argument("--list", action="store_true", help="print the points with their indices and exit")
    parser.add_argument("--index", type=int, help="run only point I (for scheduler array jobs)")
    parser.add_argument("--dry-run", action="store_true", help="print each point's fit command and exit")
    parser.add_argument("--summarize", action="store_true", help="only (re)write the summary")
    parser.add_argument("--root", help="override the sweep's output root")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    if args.root:
        sweep["root"] = args.root
    pts = points(sweep)
    if args.list:
        for i, p in enumerate(pts):
            print(f"{i}\t{p['name']}\t{read_status(point_dir(sweep, p)).get('status', 'pending')}")
        return 0
    if args.index is not None and not 0 <= args.index < len(pts):
        last = len(pts) - 1
        raise ConfigError(f"--index {args.index} is out of range: {args.sweep} has {len(pts)} points (0..{last})")
    indices = [args.index] if args.index is not None else range(len(pts))
    selected = [pts[i] for i in indices]
    if args.dry_run:
        for i in indices:
            print(dry_run(sweep, pts[i], i), flush=True)
        return 0
    failed = 0
    if not args.summarize:
        n = len(selected)
        results = [run_point(sweep, p, f"{i}/{n}") for i, p in enumerate(selected, 1)]
        failed, skipped = results.count("failed"), results.count("skipped")
        before = f" ({skipped} finished before, skipped)" if skipped else ""
        print(f"[ablate] {n - failed} ok, {failed} failed of {n}{before}", flush=True)
    summarize(sweep)
    # A failed point fails the command (and its SLURM array task), after the other points and the summary.
    return EXIT_FAILED_POINTS if failed else 0
