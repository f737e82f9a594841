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
import re
import shutil
import socket
from pathlib import Path

from phi3lit.errors import EnvironmentProblem

_held: list = []  # open lock files: the lock lasts as long as the process (or until release_run_folder)
# The folder this process locked and what it held before, so a fit that fails before training leaves it as it was.
_run: dict = {"root": None, "before": None, "started": False}
# What a fit writes before its first step: removed again if it fails before training (`undo_unstarted_run`).
_SETUP_NAMES = re.compile(r"\.phi3lit\.lock|tb|checkpoints|config\.yaml|config-resume-\d+\.yaml")


def refuse_link(path: Path, what: str) -> None:
    """phi3lit writes into folders the user names; a link planted there would redirect the write elsewhere."""
    if path.is_symlink():
        raise EnvironmentProblem(
            f"{path}: is a symbolic link; phi3lit never writes {what} through a link it did not make. Remove the "
            "link (or choose another trainer.default_root_dir)"
        )


def folder_entries(root: Path) -> set[str] | None:
    """What `root` holds now (None: it does not exist): taken before a fit writes anything, for `undo_unstarted_run`."""
    return set(os.listdir(root)) if root.is_dir() else None


def lock_run_folder(root: Path, before: set[str] | None = None) -> None:
    """Take the run folder's lock. `before`: `folder_entries(root)` from before this fit touched it."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return  # a DDP rank started by the launcher, which holds the lock for the whole run
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".phi3lit.lock"
    refuse_link(path, "its lock")
    try:  # O_NOFOLLOW: a link planted between the check and the open is refused too
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise EnvironmentProblem(f"{path}: cannot open the run lock ({e.strerror or e})") from None
    f = os.fdopen(fd, "r+")  # kept open on purpose: closing it would release the lock
    holder = take_lock(f)
    if holder is not None:
        raise EnvironmentProblem(
            f"trainer.default_root_dir={str(root)!r} is in use by a running fit ({holder}); wait for it to end, "
            "or give this run another --trainer.default_root_dir"
        )
    sign_lock(f)
    _held.append(f)
    _run.update(root=root, before=before, started=False)


def take_lock(f) -> str | None:
    """An exclusive flock on the open lock file `f`, without waiting: None once held, else who holds it (what the
    holder wrote in it), `f` then closed. The kernel drops an flock when its holder dies: nothing to clean up."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        return holder
    return None


def sign_lock(f) -> None:
    """Write who holds the lock (pid and host) into it, for the message of whoever finds it taken."""
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()


def training_started() -> None:
    """From here on the run folder holds a run (its first step is being trained): a failure keeps it."""
    _run["started"] = True


def undo_unstarted_run() -> list[str]:
    """After a fit that failed before its first step: remove what it added to the run folder (its lock, `tb/`,
    `config.yaml`, `config-resume-N.yaml`, an empty `checkpoints/`), and the folder if it made it and it is empty.
    Entries that were there before, and anything else, stay. Links are removed, never followed."""
    root, before = _run["root"], _run["before"]
    if root is None or _run["started"]:
        return []
    _run["root"] = None
    removed = []
    for name in sorted(set(os.listdir(root)) - (before or set())) if root.is_dir() else []:
        path = root / name
        if not _SETUP_NAMES.fullmatch(name) or (name == "checkpoints" and any(path.iterdir())):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
    if before is None and root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    return removed


def release_run_folder() -> None:
    while _held:
        _held.pop().close()
    _run["root"] = None


def check_not_mixing(root: Path, resuming: bool) -> None:
    """A new (not resumed) fit must not write into a folder that holds another run's checkpoints."""
    earlier = sorted((root / "checkpoints").glob("*.ckpt")) if (root / "checkpoints").is_dir() else []
    if earlier and not resuming:
        raise EnvironmentProblem(
            f"trainer.default_root_dir={str(root)!r} already holds checkpoints of an earlier run "
            f"({', '.join(p.name for p in earlier[:3])}{' ...' if len(earlier) > 3 else ''}). Resume it with "
            "--ckpt_path last, or start this run in another folder (or delete that one)"
        )
