"""Checkpoint files that survive kills, are never unpickled, and say when they are damaged.

Writing: a checkpoint is written to a temporary name in the same folder, flushed and fsync'ed, then renamed over
the final name (`os.replace` is atomic on POSIX), and the folder entry is fsync'ed. A process killed at any moment
leaves either the previous file or the new one under the final name, never a partial file; a stray
`<name>.tmp-<pid>` file is all that can remain, and the next fit in the folder removes it (`remove_stale_temps`).

Reading: `torch.load(weights_only=True)`, so a file can hold tensors and plain data (dicts, lists, numbers,
strings) and nothing that runs code when loaded; a crafted pickle is refused in one line. phi3lit's own checkpoints
hold nothing else (tested).

Checksum: torch's zip reader checks no CRC, so a flipped byte inside a tensor loads silently. Every checkpoint
phi3lit writes carries `phi3lit_sha256`, a SHA-256 over its whole content (every key, value and tensor byte, in a
fixed order), computed before writing and checked after reading. It lives inside the file, so the atomic rename
covers it: no window in which a file and a separate checksum file disagree.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from phi3lit.errors import CheckpointError, EnvironmentProblem
from phi3lit.files import atomic_file

DIGEST_KEY = "phi3lit_sha256"


def content_digest(obj: Any) -> str:
    """SHA-256 over a checkpoint's content in a fixed order: keys, types, values and tensors' dtype, shape and bytes."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for key in sorted(x, key=repr):
                walk(key)
                walk(x[key])
        elif isinstance(x, list | tuple):
            h.update(f"{type(x).__name__[0]}{len(x)}".encode())
            for item in x:
                walk(item)
        else:  # numbers, strings, bools, None: what weights_only loading allows besides tensors
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, dict):
        obj = {**obj, DIGEST_KEY: content_digest(obj)}
    with atomic_file(path) as f:  # <name>.tmp-<pid>, fsync'ed, renamed over `path`, the rename fsync'ed too
        torch.save(obj, f)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, suggest: bool = True) -> dict:
    """A checkpoint's content, loaded without unpickling code and checked against its checksum. `suggest`: a
    damaged file's message names the newest intact checkpoint beside it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # no code named: not a pickle torch can read at all (damaged, or another format)
            raise CheckpointError(
                f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:200]}). It may be truncated or "
                f"corrupt. {_earlier_hint(path) if suggest else ''}"
            ) from None
        # weights_only refused a global (a function or class): loading it the old way would run code it names
        raise CheckpointError(
            f"{path}: refused: it names Python code ({found.group(1)}) that loading it would run. phi3lit "
            "checkpoints hold tensors and plain data only; this file is not one of them (or was crafted). Load only "
            "checkpoints you trust"
        ) from None
    except Exception as e:  # truncated zip, not a torch file at all
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"It may be truncated or corrupt. {_earlier_hint(path) if suggest else ''}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise CheckpointError(f"{path}: a torch file, but not a phi3lit (Lightning) checkpoint: no state_dict")
    expected = checkpoint.pop(DIGEST_KEY, None)
    if expected is None:
        rank_zero_info(f"[phi3lit] {path}: no checksum in it (written by another tool or an earlier phi3lit); "
                       "loaded unverified")  # fmt: skip
    elif content_digest(checkpoint) != expected:
        raise CheckpointError(
            f"{path}: damaged: its content does not match the checksum written with it, so some bytes changed on "
            f"disk or in transit. {_earlier_hint(path) if suggest else ''}"
        )
    return checkpoint


def _earlier_hint(path: Path) -> str:
    """What to do instead: the newest intact checkpoint in the same folder, as the option that uses it."""
    intact = newest_intact(path.parent, besides=path)
    if intact is None:
        return "There is no intact checkpoint beside it to resume from."
    return f"The newest intact one beside it: resume with --ckpt_path {shlex.quote(str(intact))}"


def checkpoints_newest_first(folder: Path) -> list[Path]:
    """`step=N.ckpt` files by step, newest first (`last.ckpt` is not among them; links are never followed)."""
    if not folder.is_dir():
        return []
    steps = []
    for p in folder.glob("step=*.ckpt"):
        m = re.fullmatch(r"step=(\d+)\.ckpt", p.name)
        if m and p.is_file() and not p.is_symlink():
            steps.append((int(m.group(1)), p))
    return [p for _, p in sorted(steps, reverse=True)]


def newest_intact(folder: Path, besides: Path | None = None) -> Path | None:
    """The newest `step=N.ckpt` in `folder` (other than `besides`) that reads and matches its checksum."""
    for p in checkpoints_newest_first(folder):
        if besides is not None and p.name == besides.name:
            continue
        try:
            read_checkpoint(p, suggest=False)
        except CheckpointError:
            continue
        return p
    return None


def remove_stale_temps(checkpoints: Path, adapter: Path) -> list[str]:
    """Remove what phi3lit's own writers left when their process was killed mid-write, and nothing else: files
    `<name>.ckpt.tmp-<pid>` in `checkpoints` (atomic_torch_save) and folders `.adapter.tmp-<pid>` and
    `.adapter.old-<pid>` beside the `adapter` folder (SaveAdapter's swap), only when that pid is not running, never
    through a link."""
    wanted = [
        (checkpoints, re.compile(r"[\w.=-]+\.ckpt\.tmp-(\d+)"), Path.is_file),
        (adapter.parent, re.compile(rf"\.{re.escape(adapter.name)}\.(?:tmp|old)-(\d+)"), Path.is_dir),
    ]
    removed = []
    for folder, names, kind in wanted:
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in folder.iterdir():
            m = names.fullmatch(p.name)
            if m is None or p.is_symlink() or not kind(p) or _alive(int(m.group(1))):
                continue
            shutil.rmtree(p) if kind is Path.is_dir else p.unlink()
            removed.append(p.name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and explained read errors."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        try:
            atomic_torch_save(checkpoint, path)
        except (OSError, RuntimeError) as e:  # full disk, quota, permissions: the previous checkpoint is intact
            # torch's zip writer reports a failed write (a full disk) as a RuntimeError from its C++ side.
            cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
            if cause is None and "inline_container" not in str(e):
                raise
            why = (cause.strerror or str(cause)) if cause is not None else str(e).splitlines()[0][:200]
            raise EnvironmentProblem(
                f"{path}: could not write the checkpoint ({why}); the previous checkpoint is untouched and nothing "
                "partial was left. Free space or choose another trainer.default_root_dir, then resume with "
                "--ckpt_path last"
            ) from None

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(path, map_location=map_location or "cpu")


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
