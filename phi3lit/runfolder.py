"""One run per run folder: a lock held for the life of the process, and no silent mixing with an earlier run.

Two `fit` processes writing one `trainer.default_root_dir` would interleave checkpoints (`last.ckpt`,
`last-v1.ckpt`), overwrite each other's adapter and config and mix their TensorBoard events, with no error. The
lock is an `flock` on `<run>/.phi3lit.lock`: the kernel releases it when the process dies however it dies, so a
lock left by a killed run is taken over by the next one without any clean-up, while a live holder is named by the
pid written in the file. Under DDP only the launching process (rank 0 of node 0) takes it; the ranks it starts
share its folder by design.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from phi3lit.errors import EnvironmentProblem

_held: list = []  # open lock files: the lock lasts as long as the process (or until release_run_folder)


def lock_run_folder(root: Path) -> None:
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return  # a DDP rank started by the launcher, which holds the lock for the whole run
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".phi3lit.lock"
    f = open(path, "a+")  # noqa: SIM115 (kept open on purpose: closing it would release the lock)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise EnvironmentProblem(
            f"trainer.default_root_dir={str(root)!r} is in use by a running fit ({holder}); wait for it to end, "
            "or give this run another --trainer.default_root_dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held.append(f)


def release_run_folder() -> None:
    while _held:
        _held.pop().close()


def check_not_mixing(root: Path, resuming: bool) -> None:
    """A new (not resumed) fit must not write into a folder that holds another run's checkpoints."""
    earlier = sorted((root / "checkpoints").glob("*.ckpt")) if (root / "checkpoints").is_dir() else []
    if earlier and not resuming:
        raise EnvironmentProblem(
            f"trainer.default_root_dir={str(root)!r} already holds checkpoints of an earlier run "
            f"({', '.join(p.name for p in earlier[:3])}{' ...' if len(earlier) > 3 else ''}). Resume it with "
            "--ckpt_path last, or start this run in another folder (or delete that one)"
        )
