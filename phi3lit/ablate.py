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
`--list` / `--index I` let a scheduler (e.g. a SLURM array) run one point per job. `summary.csv`, `summary.md`
and `summary.png` collect the results.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

SUMMARY_COLUMNS = [
    "trainable_params", "adapter_mb", "best_val_loss", "final_val_loss", "best_val_ppl", "final_val_ppl",
    "val_token_acc", "tokens_per_sec", "peak_memory_gb", "wall_s", "status",
]  # fmt: skip


# ---------------------------------------------------------------------------- points
def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    sweep = yaml.safe_load(path.read_text())
    if not isinstance(sweep, dict) or "base" not in sweep or not isinstance(sweep.get("grid"), dict):
        raise SystemExit(f"{path}: a sweep needs `base:` (a config file) and `grid:` (key: [values, ...])")
    sweep.setdefault("name", path.stem)
    sweep.setdefault("root", "runs/sweeps")
    sweep.setdefault("fixed", {})
    sweep.setdefault("seeds", [None])
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


def run_point(sweep: dict, point: dict) -> str:
    folder = point_dir(sweep, point)
    status = read_status(folder)
    if status.get("status") == "ok":
        print(f"[ablate] {point['name']}: done, skipped", flush=True)
        return "ok"
    resume = (folder / "checkpoints" / "last.ckpt").exists()
    print(f"[ablate] {point['name']}: {'resuming' if resume else 'starting'}", flush=True)
    start = time.time()
    spent = status.get("wall_s", 0.0)
    write_status(folder, status="running", wall_s=spent)
    cmd = [sys.executable, "-m", "phi3lit", *fit_args(sweep, point, resume)]
    with open(folder / "fit.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = spent + time.time() - start
    if proc.returncode == 0:
        write_status(folder, status="ok", wall_s=wall)
        return "ok"
    tail = (folder / "fit.log").read_text().strip().splitlines()[-5:]
    write_status(folder, status="failed", wall_s=wall, returncode=proc.returncode, error="\n".join(tail))
    print(f"[ablate] {point['name']}: FAILED (exit {proc.returncode}); see {folder / 'fit.log'}", flush=True)
    return "failed"


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
    tps = values("hp/tokens_per_sec")
    row["tokens_per_sec"] = round(tps[-1]) if tps and tps[-1] > 0 else ""
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


def summarize(sweep: dict) -> Path:
    pts = points(sweep)
    rows = [summarize_point(sweep, p) for p in pts]
    out = Path(sweep["root"]) / sweep["name"]
    out.mkdir(parents=True, exist_ok=True)
    columns = [short(k) for k in sweep["grid"]] + (["seed"] if pts and pts[0]["seed"] is not None else [])
    columns += SUMMARY_COLUMNS
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot_summary(sweep, rows, out / "summary.png")
    print(f"[ablate] summary: {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'summary.png'}", flush=True)
    return out


def plot_summary(sweep: dict, rows: list[dict], path: Path) -> None:
    """Val loss against rank (log-x), one line per other grid value; trainable params against val loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [short(k) for k in sweep["grid"]]
    x_key = "r" if "r" in keys else keys[0]
    other = [k for k in keys if k != x_key]
    done = [r for r in rows if r["status"] == "ok" and r["final_val_loss"] != ""]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in done:
        groups.setdefault(", ".join(str(r[k]) for k in other) or "all", []).append(r)
    for label, group in sorted(groups.items()):
        group = sorted(group, key=lambda r: float(r[x_key]))
        ax1.plot([float(r[x_key]) for r in group], [r["final_val_loss"] for r in group], "o-", label=label)
        params = [r["trainable_params"] or math.nan for r in group]
        ax2.scatter(params, [r["final_val_loss"] for r in group], label=label)
    ax1.set_xscale("log", base=2)
    ax1.set(xlabel=x_key, ylabel="final val loss", title=f"{sweep['name']}: val loss vs {x_key}")
    ax2.set_xscale("log")
    ax2.set(xlabel="trainable parameters", ylabel="final val loss", title="val loss vs trainable parameters")
    for ax in (ax1, ax2):
        if groups:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- command
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi3lit ablate", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="sweep YAML file (see experiments/)")
    parser.add_argument("--list", action="store_true", help="print the points with their indices and exit")
    parser.add_argument("--index", type=int, help="run only point I (for scheduler array jobs)")
    parser.add_argument("--dry-run", action="store_true", help="print each point's resolved config and exit")
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
        parser.error(f"--index {args.index} is out of range: the sweep has {len(pts)} points (0..{len(pts) - 1})")
    selected = [pts[args.index]] if args.index is not None else pts
    if args.dry_run:
        for p in selected:
            print(f"# ---- {p['name']}  ({point_dir(sweep, p)})", flush=True)
            subprocess.run([sys.executable, "-m", "phi3lit", *fit_args(sweep, p, False), "--print_config"], check=True)
        return 0
    if not args.summarize:
        results = [run_point(sweep, p) for p in selected]
        print(f"[ablate] {results.count('ok')} ok, {results.count('failed')} failed of {len(selected)}", flush=True)
    summarize(sweep)
    return 0
