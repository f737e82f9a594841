"""Writing files and folders whole or not at all: the one write-then-rename that every phi3lit output goes through.

A kill, a full disk or a crash in the middle of a write must never leave a half-written checkpoint, adapter,
status or cache entry under the real name, where the next reader would take it for a whole one. So everything is
written under a temporary name in the same folder (same filesystem, so the rename is atomic), made durable with
fsync, and renamed over the real name; a failure removes the temporary and leaves the previous version (or none).

The temporary names are fixed so that what a killed process left is recognisable (`checkpoint.remove_stale_temps`):

    file   <name>.tmp-<pid>        created new (O_EXCL) and never through a link (O_NOFOLLOW)
    folder .<name>.tmp-<pid>/      made here, so never a link someone planted at the name
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def temp_file_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def temp_folder_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (the new entry survives a power cut, not only a kill)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform or filesystem that cannot open a folder: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True, temp: Path | None = None) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path` for a writer that wants a file name (Arrow, torch); on success
    it replaces `path` (a link at `path` is replaced as a link, never written through). `temp`: another temporary
    name in the same folder (a shared cache names its temporaries by host and pid)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp or temp_file_name(path)
    tmp.unlink(missing_ok=True)  # our own pid's leftover: nobody else writes this name
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)


def create_new(path: Path, mode: str = "wb") -> IO:
    """A new file opened for writing: never an existing file, nor through a link someone put at that name."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), mode)


@contextmanager
def atomic_file(
    path: str | os.PathLike, mode: str = "wb", durable: bool = True, temp: Path | None = None
) -> Iterator[IO]:
    """Open a new temporary file beside `path` for writing (`mode` "wb" or "w"); on success it replaces `path`."""
    with atomic_path(path, durable, temp) as tmp, create_new(tmp, mode) as f:
        yield f
        f.flush()


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = True) -> None:
    with atomic_file(path, "w", durable) as f:
        f.write(text)


def remove(path: Path, ignore_errors: bool = False) -> None:
    """Remove a folder phi3lit made, or a link (never what it points to)."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except OSError:
        if not ignore_errors:
            raise


@contextmanager
def atomic_folder(path: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a new empty temporary folder beside `path`; on success it takes `path`'s place whole.

    An existing `path` is swapped out and removed (a link there is removed as a link, its target left alone), or,
    with `keep_existing`, kept: then the first of several concurrent writers of identical content wins (the
    built-in tiny model, built by every DDP rank at once). On failure the temporary folder is removed and `path`
    is as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder_name(path)
    remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if keep_existing:
            try:
                tmp.rename(path)
            except OSError:  # another process won the race; its copy is the same
                remove(tmp, ignore_errors=True)
            return
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            remove(old)
        else:
            tmp.rename(path)
    except BaseException:
        remove(tmp, ignore_errors=True)
        raise
