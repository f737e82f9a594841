"""`python -m phi3lit ablate experiments/NAME.yaml`: sweep a grid of config overrides through `fit`.

What a sweep file holds, how it expands into points and what each point's fit command is: `phi3lit.tools.sweep.grid`.
This module runs the points and writes the summary (`phi3lit.tools.sweep.summary`).

Every point runs `python -m phi3lit fit` in its own process (the same path as a normal run) with its own run
folder `<root>/<sweep>/<point name>/`, so TensorBoard shows the whole sweep side by side (HPARAMS included).
`status.json` in each folder makes the sweep resumable: finished points are skipped, an interrupted point
resumes from its newest checkpoint (`--ckpt_path last` whenever its checkpoints/ holds any `*.ckpt`), and a
failed point is recorded with its error while the sweep goes on. Each finished point prints one greppable result
line. `--list true` / `--index I` let a scheduler (e.g. a SLURM array) run one point per job; `--dry_run true`
prints each point's `python -m phi3lit fit ...` command. `summary.csv`, `summary_stats.csv`, `summary.md` and
`summary.png` collect the results (with `seeds:`, mean, std and a 95% Student-t interval per grid point, compared
at equal tokens seen: `phi3lit.tools.sweep.stats`). Exit status: 0 when every selected point is done, 1 when one
failed (after the others ran and the summary was written), 2 for a bad sweep file or option (a one-line error).

Several workers may run one sweep (overlapping SLURM array tasks, a rerun while a point runs): each point is
taken under an flock on `<point>/.ablate.lock`, and a worker that finds a point taken skips it, saying so. The
kernel drops an flock when its holder dies, so a killed worker leaves nothing to clean up. The files ablate
writes in a point's folder (`.ablate.lock`, `status.json`, `fit.log`) are opened without following symlinks: a
planted one is refused in one line, its target untouched.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from phi3lit.errors import ConfigError
from phi3lit.run.runfolder import sign_lock, take_lock
from phi3lit.tools.sweep.grid import (
    dry_run as fit_command_line,
)
from phi3lit.tools.sweep.grid import (
    eval_args,
    fit_args,
    has_checkpoint,
    load_sweep,
    open_nofollow,
    point_dir,
    points,
    read_status,
    write_status,
)
from phi3lit.tools.sweep.summary import summarize as write_summary
from phi3lit.tools.sweep.summary import summarize_point

EXIT_FAILED_POINTS = 1  # some point failed; config errors exit 2 (the CLI's handler), as they do for fit
LOCK_NAME = ".ablate.lock"


# ---------------------------------------------------------------------------- taking a point
def take_point(folder: Path):
    """The point's lock, an flock on `<point>/.ablate.lock`, or (None, who holds it).

    The kernel drops an flock when its holder dies, however it dies, so a killed worker leaves nothing to clean
    up. The fit child inherits the locked descriptor: the point stays taken while the fit runs, even if the
    worker that started it is gone. A fit started by hand in the folder holds `.phi3lit.lock`; that counts too.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd = open_nofollow(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, "the point's lock")
    f = os.fdopen(fd, "r+")  # kept open: closing it releases the lock
    holder = take_lock(f)
    if holder is not None:
        return None, holder
    fit_holder = fit_lock_holder(folder)
    if fit_holder:
        f.close()
        return None, f"a fit, {fit_holder}"
    sign_lock(f)
    return f, ""


def fit_lock_holder(folder: Path) -> str:
    """Who holds fit's own run-folder lock (phi3lit.run.runfolder), or "" when nobody does."""
    try:  # read-only and not through a symlink: the probe creates, truncates and writes nothing
        fd = open_nofollow(folder / ".phi3lit.lock", os.O_RDONLY, "fit's run-folder lock")
    except FileNotFoundError:
        return ""
    with os.fdopen(fd) as f:
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
    try:
        fd = open_nofollow(folder / LOCK_NAME, os.O_RDONLY, "the point's lock")
    except FileNotFoundError:
        return "interrupted" if state == "running" else state
    with os.fdopen(fd) as f:
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
        resume = has_checkpoint(folder)  # last.ckpt, or only a step=N.ckpt when killed between the two writes
        print(f"{label}: {'resuming' if resume else 'starting'}", flush=True)
        start = time.time()
        spent = status.get("wall_s", 0.0)
        write_status(folder, status="running", wall_s=spent)
        cmd = [sys.executable, "-m", "phi3lit", *fit_args(sweep, point, resume)]
        fd = open_nofollow(folder / "fit.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, "the point's fit log")
        with os.fdopen(fd, "a") as log:
            offset = log.tell()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, pass_fds=(lock.fileno(),))
        wall = spent + time.time() - start
        with open(folder / "fit.log", "rb") as log:
            log.seek(offset)
            stopped = b"[phi3lit] fit stopped:" in log.read()  # a signal (preemption, Ctrl-C): saved, exit 0
        if proc.returncode == 0 and stopped:
            write_status(folder, status="stopped", wall_s=wall)
            print(f"{label}: stopped by a signal before its last step; a rerun resumes it", flush=True)
            return "stopped"
        if proc.returncode == 0 and sweep["eval"]:  # downstream scores, into the point's TensorBoard
            fd = open_nofollow(folder / "fit.log", os.O_WRONLY | os.O_APPEND, "the point's fit log")
            with os.fdopen(fd, "a") as log:
                cmd = [sys.executable, "-m", "phi3lit", *eval_args(sweep, point)]
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode == 0:
            write_status(folder, status="ok", wall_s=wall)
        else:
            with open(folder / "fit.log", "rb") as log:  # the file just written through fd (no symlink)
                tail = log.read().decode(errors="replace").strip().splitlines()[-5:]
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


# ---------------------------------------------------------------------------- command
def ablate(
    sweep: str,
    list: bool = False,  # noqa: A002 (the option's name, as users type it)
    index: int | None = None,
    dry_run: bool = False,
    summarize: bool = False,
    root: str | None = None,
) -> int:
    """Run a sweep file's grid of fit overrides, one `python -m phi3lit fit` per point, and summarise it.

    Args:
        sweep: the sweep YAML file (see experiments/).
        list: print the points with their indices and states, and exit.
        index: run only point I (for scheduler array jobs).
        dry_run: print each point's fit command, and exit.
        summarize: only (re)write the summary, from the points that have finished.
        root: the output root instead of the sweep file's.

    Returns the exit status: 0 when every selected point is done, 1 when one failed.
    """
    sweep_file, sweep = sweep, load_sweep(sweep)
    if root:
        sweep["root"] = root
    pts = points(sweep)
    if list:
        for i, p in enumerate(pts):
            print(f"{i}\t{p['name']}\t{point_state(point_dir(sweep, p))}")
        return 0
    if index is not None and not 0 <= index < len(pts):
        last = len(pts) - 1
        raise ConfigError(f"--index {index} is out of range: {sweep_file} has {len(pts)} points (0..{last})")
    indices = [index] if index is not None else range(len(pts))
    selected = [pts[i] for i in indices]
    if dry_run:
        for i in indices:
            print(fit_command_line(sweep, pts[i], i), flush=True)
        return 0
    failed = 0
    if not summarize:
        n = len(selected)
        results = [run_point(sweep, p, f"{i}/{n}") for i, p in enumerate(selected, 1)]
        failed, skipped, busy = results.count("failed"), results.count("skipped"), results.count("busy")
        stopped = results.count("stopped")
        before = f" ({skipped} finished before, skipped)" if skipped else ""
        elsewhere = f" ({busy} running in another process, skipped)" if busy else ""
        halted = f" ({stopped} stopped by a signal, to resume)" if stopped else ""
        ok = n - failed - busy - stopped
        print(f"[ablate] {ok} ok, {failed} failed of {n}{before}{elsewhere}{halted}", flush=True)
    write_summary(sweep)
    # A failed point fails the command (and its SLURM array task), after the other points and the summary.
    return EXIT_FAILED_POINTS if failed else 0
