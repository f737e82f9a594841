"""Checkpoint files that survive kills, and read errors that name the file.

A checkpoint is written to a temporary name in the same folder, flushed and fsync'ed, then renamed over the
final name (`os.replace` is atomic on POSIX), and the folder entry is fsync'ed. A process killed at any moment
leaves either the previous file or the new one under the final name, never a partial file; a stray
`*.tmp-<pid>` file is all that can remain. Reading turns unpickling and zip errors into one clear message.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from phi3lit.errors import CheckpointError, EnvironmentProblem


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, not a torch file at all
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "It may be truncated or corrupt: resume from an earlier checkpoint in the same folder."
        ) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and explained read errors."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as e:  # full disk, quota, permissions: the previous checkpoint is intact
            raise EnvironmentProblem(
                f"{path}: could not write the checkpoint ({e.strerror or e}); the previous checkpoint is untouched. "
                "Free space or choose another trainer.default_root_dir, then resume with --ckpt_path last"
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
