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

Seeds: with `seeds: [0, 1, 2]` every grid point runs once per seed, and `summary_stats.csv` (and the first table
of `summary.md`, and the error bars of `summary.png`) give, per grid point and metric, the mean, the sample
standard deviation and a 95% Student-t interval over the seeds that finished. Points are compared at equal
tokens seen (`eq_val_loss`), and a point whose difference from the best is smaller than the seed spread is
marked as such. `model.lora.alpha` may be a rule: a number (fixed alpha, scale alpha/r), `2r` (alpha = 2*r, a
constant scale 2) or `rslora` / `rslora:16` (use_rslora, scale alpha/sqrt(r)); the summary shows each point's
effective scale. Several workers may run one sweep (overlapping SLURM array tasks, a rerun while a point runs):
each point is taken under an flock on `<point>/.ablate.lock`, and a worker that finds a point taken skips it,
saying so.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import itertools
import json
import math
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from phi3lit.errors import ConfigError

SUMMARY_COLUMNS = [
    "scale", "trainable_params", "adapter_mb", "tokens_seen", "eq_tokens", "eq_val_loss", "best_val_loss",
    "final_val_loss", "best_val_ppl", "final_val_ppl", "val_token_acc", "tokens_per_sec", "peak_memory_gb",
    "wall_s", "status",
]  # fmt: skip
# Metrics summarised over seeds (mean, std, 95% interval); the first one ranks the points.
STAT_METRICS = ["eq_val_loss", "best_val_loss", "final_val_loss", "val_token_acc", "tokens_per_sec"]
ALPHA_KEY, RSLORA_KEY, RANK_KEY = "model.lora.alpha", "model.lora.use_rslora", "model.lora.r"
LORA_DEFAULTS = {RANK_KEY: 16, ALPHA_KEY: 32.0, RSLORA_KEY: False}  # phi3lit.lora.LoraSpec's defaults
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
    rules = [alpha_rule(v, path) for v in grid.get(ALPHA_KEY, [])]
    rules += [alpha_rule(fixed[ALPHA_KEY], path)] if ALPHA_KEY in fixed else []
    if any(kind == "rslora" for kind, _ in rules) and (RSLORA_KEY in grid or RSLORA_KEY in fixed):
        raise ConfigError(f"{path}: {ALPHA_KEY}: rslora sets {RSLORA_KEY}; do not also set {RSLORA_KEY}")
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


def readable(value, key: str = "") -> str:
    if key == ALPHA_KEY:  # a rule by its short name: 32, 2r, rslora, rslora16 (no `*` or `:` in folder names)
        kind, x = alpha_rule(value)
        if kind == "per_r":
            return f"{x:g}r"
        if kind == "rslora":
            return "rslora" if x is None else f"rslora{x:g}"
    if isinstance(value, list | tuple):
        return "+".join(map(str, value))
    return str(value)


# ---------------------------------------------------------------------------- alpha rules and the update scale
ALPHA_RULES = "a number (fixed alpha: scale alpha/r), `<k>r` such as 2r (alpha = k*r: scale k), `rslora[:<alpha>]`"


def alpha_rule(value, where: str | Path = "") -> tuple[str, float | None]:
    """`model.lora.alpha` in a sweep: ("fixed", alpha), ("per_r", k) for `2r` / `2*r`, ("rslora", alpha or None)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return "fixed", float(value)
    text = str(value).replace(" ", "").lower()
    if (m := re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\*?r", text)) and float(m.group(1)) > 0:
        return "per_r", float(m.group(1))
    m = re.fullmatch(r"rslora(?::(\d+(?:\.\d*)?|\.\d+))?", text)
    if m and (m.group(1) is None or float(m.group(1)) > 0):
        return "rslora", None if m.group(1) is None else float(m.group(1))
    if re.fullmatch(r"\d+(?:\.\d*)?(?:e[-+]?\d+)?", text) and float(text) > 0:
        return "fixed", float(text)
    prefix = f"{where}: " if where else ""
    raise ConfigError(f"{prefix}{ALPHA_KEY}: {value!r} is not an alpha rule; use {ALPHA_RULES}")


def base_value(sweep: dict, key: str):
    """A dotted key's value in the sweep's base config, else phi3lit's default (None when neither has it)."""
    try:
        node = yaml.safe_load(Path(sweep["base"]).read_text())
        for part in key.split("."):
            node = node[part]
        return node
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return LORA_DEFAULTS.get(key)


def apply_alpha_rule(sweep: dict, overrides: dict) -> dict:
    """The fit overrides for a point: an alpha rule becomes a number (and use_rslora), computed from the point's r."""
    if ALPHA_KEY not in overrides:
        return overrides
    out = dict(overrides)
    kind, x = alpha_rule(out[ALPHA_KEY])
    if kind == "fixed":
        out[ALPHA_KEY] = out[ALPHA_KEY] if isinstance(out[ALPHA_KEY], int | float) else x  # as written
    elif kind == "per_r":
        r = out.get(RANK_KEY, base_value(sweep, RANK_KEY))
        if number(r) is None:
            raise ConfigError(f"{ALPHA_KEY}: {out[ALPHA_KEY]!r} needs a numeric {RANK_KEY}, got {r!r}")
        alpha = round(x * float(r), 10)
        out[ALPHA_KEY] = int(alpha) if alpha.is_integer() else alpha
    else:
        out[RSLORA_KEY] = True
        if x is None:
            del out[ALPHA_KEY]
        else:
            out[ALPHA_KEY] = int(x) if x.is_integer() else x
    return out


def effective_scale(r, alpha, rslora) -> float | None:
    """What multiplies B A: alpha / r, or alpha / sqrt(r) with rsLoRA (per slice for sliced targets)."""
    r, alpha = number(r), number(alpha)
    if not r or alpha is None:
        return None
    return alpha / (math.sqrt(r) if rslora in (True, "true", "True") else r)


def points(sweep: dict) -> list[dict]:
    """Grid x seeds, in a stable order: [{"name", "overrides", "values", "seed"}]."""
    keys = list(sweep["grid"])
    out = []
    for combo in itertools.product(*(sweep["grid"][k] for k in keys)):
        for seed in sweep["seeds"]:
            values = dict(zip(keys, combo, strict=True))
            name = "__".join(f"{short(k)}={readable(v, k)}" for k, v in values.items())
            if seed is not None:
                name += f"__seed={seed}"
            overrides = apply_alpha_rule(sweep, {**sweep["fixed"], **values})
            out.append({"name": name, "values": values, "seed": seed, "overrides": overrides})
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


LOCK_NAME = ".ablate.lock"


def take_point(folder: Path):
    """The point's lock, an flock on `<point>/.ablate.lock`, or (None, who holds it).

    The kernel drops an flock when its holder dies, however it dies, so a killed worker leaves nothing to clean
    up. The fit child inherits the locked descriptor: the point stays taken while the fit runs, even if the
    worker that started it is gone. A fit started by hand in the folder holds `.phi3lit.lock`; that counts too.
    """
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 (kept open: closing it releases the lock)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        return None, holder
    fit_holder = fit_lock_holder(folder)
    if fit_holder:
        f.close()
        return None, f"a fit, {fit_holder}"
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f, ""


def fit_lock_holder(folder: Path) -> str:
    """Who holds fit's own run-folder lock (phi3lit.runfolder), or "" when nobody does."""
    path = folder / ".phi3lit.lock"
    if not path.exists():
        return ""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return ""


def point_state(folder: Path) -> str:
    """pending, running (its lock is held now), interrupted (marked running, nobody holds it), stopped, ok, failed."""
    state = read_status(folder).get("status", "pending")
    if not (folder / LOCK_NAME).exists():
        return "interrupted" if state == "running" else state
    with open(folder / LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return "running"
    return "interrupted" if state == "running" else state


def run_point(sweep: dict, point: dict, progress: str = "") -> str:
    """Run one point unless it is done or taken: "ok", "failed", "skipped" (finished before), "busy" (taken by
    another worker) or "stopped" (its fit saved and exited on a signal before the last step: not done)."""
    folder = point_dir(sweep, point)
    label = f"[ablate] {progress}{' ' if progress else ''}{point['name']}"
    if read_status(folder).get("status") == "ok":  # finished points need no lock (and no folder writes)
        print(f"{label}: done, skipped", flush=True)
        return "skipped"
    lock, holder = take_point(folder)
    if lock is None:
        print(f"{label}: running in another process ({holder}), skipped", flush=True)
        return "busy"
    with lock:
        status = read_status(folder)  # again, under the lock: another worker may have finished it meanwhile
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
            offset = log.tell()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, pass_fds=(lock.fileno(),))
        wall = spent + time.time() - start
        with open(folder / "fit.log", "rb") as log:
            log.seek(offset)
            stopped = b"[phi3lit] fit stopped:" in log.read()  # a signal (preemption, Ctrl-C): saved, exit 0
        if proc.returncode == 0 and stopped:
            write_status(folder, status="stopped", wall_s=wall)
            print(f"{label}: stopped by a signal before its last step; a rerun resumes it from last.ckpt", flush=True)
            return "stopped"
        if proc.returncode == 0:
            write_status(folder, status="ok", wall_s=wall)
        else:
            tail = (folder / "fit.log").read_text().strip().splitlines()[-5:]
            write_status(folder, status="failed", wall_s=wall, returncode=proc.returncode, error="\n".join(tail))
    row = summarize_point(sweep, point)
    print(result_line(label, row, proc.returncode, folder), flush=True)  # progress in logs
    return "ok" if proc.returncode == 0 else "failed"


RESULT_KEYS = ["best_val_loss", "final_val_loss", "tokens_per_sec", "wall_s"]


def result_line(label: str, row: dict, returncode: int, folder: Path) -> str:
    """One greppable line per finished point: `<label>: ok  best_val_loss=... final_val_loss=... ...`."""
    values = " ".join(f"{k}={row.get(k) if row.get(k) != '' else '-'}" for k in RESULT_KEYS)
    if returncode == 0:
        return f"{label}: ok  {values}"
    return f"{label}: FAILED (exit {returncode}; see {folder / 'fit.log'})  {values}"


# ---------------------------------------------------------------------------- summary
def run_config(folder: Path) -> dict:
    """The point's resolved config as fit wrote it (`<point>/config.yaml`), or {} before it ran."""
    try:
        return yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def dotted(cfg: dict, key: str, default=None):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def tokens_per_step(cfg: dict) -> int | None:
    """Token slots one optimizer step trains on: packed rows x row length x accumulation x devices x nodes.

    `trainer.devices` other than a count or a list (auto, -1) is counted as one device."""
    batch, length = number(dotted(cfg, "data.batch_size")), number(dotted(cfg, "data.max_length"))
    if not batch or not length:
        return None
    accumulate = number(dotted(cfg, "trainer.accumulate_grad_batches")) or 1
    devices = dotted(cfg, "trainer.devices")
    devices = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) and devices > 0 else 1
    nodes = number(dotted(cfg, "trainer.num_nodes")) or 1
    return int(batch * length * accumulate * devices * nodes)


def summarize_point(sweep: dict, point: dict) -> dict:
    from phi3lit.events import read_scalars

    folder = point_dir(sweep, point)
    row = {short(k): readable(v, k) for k, v in point["values"].items()}
    if point["seed"] is not None:
        row["seed"] = point["seed"]
    status = read_status(folder)
    row["status"] = status.get("status", "pending")
    row["wall_s"] = round(status.get("wall_s", 0.0), 1)
    cfg = run_config(folder)
    lora = {k: dotted(cfg, k, point["overrides"].get(k, base_value(sweep, k))) for k in LORA_DEFAULTS}
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
    per_step = tokens_per_step(cfg)
    curve = [(step * per_step, v) for step, v in scalars.get("val/loss", [])] if per_step else []
    row["tokens_seen"] = curve[-1][0] if curve else ""
    row["_curve"] = sorted(curve)  # (tokens seen, val loss) at each validation; not written out
    return row


def trainable_from_log(folder: Path):
    log = folder / "fit.log"
    if not log.exists():
        return ""
    for line in log.read_text().splitlines():
        if "[phi3lit] trainable params:" in line:  # the effective count phi3lit prints at the start of fit
            return int(line.split("trainable params:")[1].split("||")[0].strip().replace(",", ""))
    return ""


def at_equal_tokens(curves: dict[str, list[tuple[float, float]]]) -> tuple[float | None, dict[str, float | None]]:
    """Compare runs at equal tokens seen: T is the smallest final tokens-seen of the curves, and each curve gives
    its value at its last evaluation at or before T (None if it has none). Curves are (tokens, value), sorted."""
    finals = [c[-1][0] for c in curves.values() if c]
    if not finals:
        return None, {k: None for k in curves}
    budget = min(finals)
    out = {}
    for k, c in curves.items():
        before = [v for t, v in c if t <= budget]
        out[k] = before[-1] if before else None
    return budget, out


# Two-sided 95% Student-t quantiles t(0.975, df), df = 1..30 (standard tables); above 30 the next lower listed df
# (conservative). scipy is not a dependency; tests/test_analyze.py checks the table against scipy when present.
T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip
T975_LARGE = [(120, 1.980), (60, 2.000), (40, 2.021), (30, 2.042)]


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    return next((t for limit, t in T975_LARGE if df >= limit), T975[-1])


def seed_stats(values: list[float]) -> dict:
    """n, mean, sample std (n-1) and the 95% Student-t interval of the mean; std and interval need two values."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "lo": None, "hi": None}
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "lo": None, "hi": None}
    std = statistics.stdev(values)
    half = t975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


def stats_rows(sweep: dict, rows: list[dict]) -> list[dict]:
    """One row per grid point: its seeds' mean, std and 95% interval per metric, and how it compares to the best.

    A point whose `eq_val_loss` mean differs from the best point's by less than the larger of the two seed
    standard deviations is marked `within_seed_spread: yes`: the seeds do not tell them apart."""
    keys = [short(k) for k in sweep["grid"]]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r[k]) for k in keys), []).append(r)
    out = []
    for combo, group in groups.items():
        done = [r for r in group if r["status"] == "ok"]
        first = done[0] if done else group[0]
        stat = {k: v for k, v in zip(keys, combo, strict=True)}
        stat |= {"n_ok": len(done), "n_runs": len(group), "scale": first.get("scale", "")}
        stat |= {"trainable_params": first.get("trainable_params", ""), "eq_tokens": first.get("eq_tokens", "")}
        for m in STAT_METRICS:
            st = seed_stats([v for v in (number(r.get(m)) for r in done) if v is not None])
            stat[f"_{m}"] = st
            for part in ("mean", "std", "lo", "hi"):
                column = f"{m}_{part}" if part in ("mean", "std") else f"{m}_ci95_{part}"
                stat[column] = "" if st[part] is None else round(st[part], 6)
        out.append(stat)
    primary = STAT_METRICS[0]
    ranked = [s for s in out if s[f"_{primary}"]["mean"] is not None]
    best = min(ranked, key=lambda s: s[f"_{primary}"]["mean"]) if ranked else None
    for s in out:
        st = s[f"_{primary}"]
        s["vs_best"] = s["within_seed_spread"] = ""
        if best is None or st["mean"] is None:
            continue
        if s is best:
            s["vs_best"] = "best"
            continue
        delta = st["mean"] - best[f"_{primary}"]["mean"]
        s["vs_best"] = round(delta, 6)
        if st["std"] is not None and best[f"_{primary}"]["std"] is not None:
            spread = max(st["std"], best[f"_{primary}"]["std"])
            s["within_seed_spread"] = "yes" if abs(delta) < spread else "no"
    return out


COLUMN_NOTES = {  # written under the table in summary.md, so a reader knows what the numbers are
    "scale": "the effective LoRA update scale of the point: alpha/r, or alpha/sqrt(r) with rsLoRA (per slice for "
    "sliced targets such as [q, v]); from the point's resolved config.yaml",
    "trainable_params": "the effective count fit prints (zero blocks of fused projections excluded)",
    "tokens_seen": "token slots trained on at the last validation: steps x data.batch_size x data.max_length x "
    "accumulation x devices (packed rows, so nearly all slots hold real tokens)",
    "eq_tokens / eq_val_loss": "points compared at equal tokens seen: eq_tokens is the smallest final tokens_seen "
    "among the finished points, eq_val_loss each point's val loss at its last validation at or before it",
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


def fmt(value, digits: int = 4) -> str:
    if value is None or value == "":
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def stat_cell(st: dict, digits: int = 4) -> str:
    if st["n"] == 0:
        return "–"
    if st["std"] is None:
        return fmt(st["mean"], digits)
    return f"{fmt(st['mean'], digits)} ± {fmt(st['std'], digits)} [{fmt(st['lo'], digits)}, {fmt(st['hi'], digits)}]"


def summarize(sweep: dict) -> Path:
    pts = points(sweep)
    rows = [summarize_point(sweep, p) for p in pts]
    done = {p["name"]: r for p, r in zip(pts, rows, strict=True) if r["status"] == "ok"}
    budget, at_budget = at_equal_tokens({name: r["_curve"] for name, r in done.items() if r["_curve"]})
    for p, r in zip(pts, rows, strict=True):
        value = at_budget.get(p["name"]) if p["name"] in done else None
        r["eq_tokens"] = int(budget) if budget is not None and value is not None else ""
        r["eq_val_loss"] = round(value, 4) if value is not None else ""
    stats = stats_rows(sweep, rows)
    out = Path(sweep["root"]) / sweep["name"]
    out.mkdir(parents=True, exist_ok=True)
    keys = [short(k) for k in sweep["grid"]]
    columns = keys + (["seed"] if pts and pts[0]["seed"] is not None else []) + SUMMARY_COLUMNS
    replace_file(out / "summary.csv", csv_text(columns, rows))
    stat_columns = keys + ["n_ok", "n_runs", "scale", "trainable_params", "eq_tokens"]
    for m in STAT_METRICS:
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
    head = keys + ["scale", "n"] + [m for m, _ in shown] + ["Δ eq_val_loss vs best"]
    lines = ["## Over seeds", "", STATS_NOTE, ""]
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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


# ---------------------------------------------------------------------------- command
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="phi3lit ablate", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="sweep YAML file (see experiments/)")
    parser.add_argument("--list", action="store_true", help="print the points with their indices and exit")
    parser.add_argument("--index", type=int, help="run only point I (for scheduler array jobs)")
    parser.add_argument("--dry-run", action="store_true", help="print each point's fit command and exit")
    parser.add_argument(
        "--summarize", action="store_true", help="only (re)write the summary, from the points that have finished"
    )
    parser.add_argument("--root", help="override the sweep's output root")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    if args.root:
        sweep["root"] = args.root
    pts = points(sweep)
    if args.list:
        for i, p in enumerate(pts):
            print(f"{i}\t{p['name']}\t{point_state(point_dir(sweep, p))}")
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
        failed, skipped, busy = results.count("failed"), results.count("skipped"), results.count("busy")
        stopped = results.count("stopped")
        before = f" ({skipped} finished before, skipped)" if skipped else ""
        elsewhere = f" ({busy} running in another process, skipped)" if busy else ""
        halted = f" ({stopped} stopped by a signal, to resume)" if stopped else ""
        ok = n - failed - busy - stopped
        print(f"[ablate] {ok} ok, {failed} failed of {n}{before}{elsewhere}{halted}", flush=True)
    summarize(sweep)
    # A failed point fails the command (and its SLURM array task), after the other points and the summary.
    return EXIT_FAILED_POINTS if failed else 0
