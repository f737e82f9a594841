"""Tokenize once: the tokenized cache, its key and its integrity.

Tokenization runs once per (conversations, tokenizer, settings, code): `tokenize_cached` tokenizes into an Arrow file
under the cache folder, named by a hash of all of those, and a later run with the same inputs loads that file instead
of tokenizing again. The code part of the key hashes every module that can change the ids (`ID_MODULES`), not one
file. The file is written under a temporary name (`phi3lit-tmp-...`, created new, never through a link), fsync'ed and
renamed into place; then a small `<key>.json` beside it records its rows, tokens, size and sha256. A cache file that
does not match its record (truncated, altered, or without one) is never read: it is tokenized again, with one log
line naming it. Temporary files that killed runs left behind are removed once their process is gone or they are 15
minutes old; nothing else in the folder is touched. A full or read-only cache folder is one `EnvironmentProblem`."""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import socket
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from phi3lit.data.chat import tokenize_example
from phi3lit.data.labels import IGNORE_INDEX
from phi3lit.errors import EnvironmentProblem
from phi3lit.files import atomic_file, atomic_path, create_new

# Every module whose code can change a cached row (its ids, labels, lengths or outcome): the key hashes them all.
ID_MODULES = (
    "phi3lit.data.formats",
    "phi3lit.data.read",
    "phi3lit.data.chat",
    "phi3lit.data.cache",
    "phi3lit.data.labels",
)


# Init kwargs that say where a tokenizer was loaded from, not how it tokenizes: left out of its fingerprint so that
# a copy of the same files in another folder shares the cache.
_LOCATION_KWARGS = {
    "name_or_path", "_name_or_path", "is_local", "local_files_only", "cache_dir", "vocab_file", "merges_file",
    "tokenizer_file", "local_dir", "token", "revision", "_commit_hash", "trust_remote_code",
}  # fmt: skip
# Already hashed in full on their own.
_HASHED_KWARGS = {"chat_template", "added_tokens_decoder"}


def _plain(value):
    """A JSON-able, address-free stand-in for a tokenizer attribute (AddedToken keeps its flags)."""
    if hasattr(value, "content") and hasattr(value, "special"):  # tokenizers.AddedToken
        return {
            k: getattr(value, k, None) for k in ("content", "lstrip", "rstrip", "normalized", "single_word", "special")
        }
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that can change its ids.

    The class, the backend's vocabulary and rules, the added tokens, the chat template, the special tokens map (the
    template renders `bos_token` / `eos_token`; all of bos/eos/unk/pad/additional are hashed) and the init kwargs
    that steer encoding (`add_bos_token`, `add_eos_token`, `clean_up_tokenization_spaces`, ...), leaving out those
    that only say where the files are (`name_or_path`, ...).
    """
    import tokenizers
    import transformers

    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = sorted((i, t.content, t.special) for i, t in tokenizer.added_tokens_decoder.items())
    special_map = _plain(dict(getattr(tokenizer, "special_tokens_map_extended", None) or tokenizer.special_tokens_map))
    special_map["all"] = list(getattr(tokenizer, "all_special_tokens", []))
    special_map["ids"] = {
        k: getattr(tokenizer, f"{k}_id", None) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    kwargs = {k: v for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items()
              if k not in _LOCATION_KWARGS | _HASHED_KWARGS}  # fmt: skip
    # Switches that a loaded tokenizer may hold as attributes rather than init kwargs.
    for name in ("add_bos_token", "add_eos_token", "add_prefix_space", "clean_up_tokenization_spaces"):
        if hasattr(tokenizer, name):
            kwargs[f"attr:{name}"] = getattr(tokenizer, name)
    # Library versions too: the same files can tokenize differently across releases (LlamaTokenizer did).
    parts = [type(tokenizer).__name__, transformers.__version__, tokenizers.__version__, str(tokenizer.chat_template)]
    extra = [
        json.dumps(special_map, sort_keys=True, default=str),
        json.dumps(_plain(kwargs), sort_keys=True, default=str),
    ]
    for part in [*parts, json.dumps(specials), *extra, state]:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def _code_version() -> str:
    """A hash of the source of every module in `ID_MODULES`: any change to them invalidates the cache."""
    h = hashlib.sha256()
    for name in ID_MODULES:
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()


def cache_key(conversations: Sequence[Sequence[dict[str, str]]], tokenizer, **settings) -> str:
    """The name of a tokenized dataset: a hash of the conversations, tokenizer, settings and the code of `ID_MODULES`.

    Hashing the conversations, not the source file, means a key is right whatever the layout, source or
    train/validation split they came from.
    """
    h = hashlib.sha256()
    digest = conversations_digest(conversations)
    for part in (_code_version(), tokenizer_fingerprint(tokenizer), json.dumps(settings, sort_keys=True), digest):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:40]


def conversations_digest(conversations: Sequence[Sequence[dict[str, str]]]) -> str:
    """A sha256 of the conversations, in order (what a split holds, whatever file or layout it came from)."""
    h = hashlib.sha256()
    for conv in conversations:
        h.update(json.dumps(conv, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


# This module's temporary files in the cache folder, `phi3lit-tmp-<host>-<pid>-<name>`: the only entries it ever
# removes there (never a folder, a link or another program's `tmp*`: the folder may be /tmp). Left behind by killed
# runs; removed when their process is gone or they have not changed for this long.
_TEMP = "phi3lit-tmp-"
_STALE_TEMP_S = 15 * 60  # a live writer touches its file at every batch of 1,000 examples, far more often


def _temp_prefix() -> str:
    return f"{_TEMP}{socket.gethostname()}-{os.getpid()}-"


def _remove_stale_temp_files(cache: Path) -> None:
    ours, now = f"{_TEMP}{socket.gethostname()}-", time.time()
    for f in cache.glob(f"{_TEMP}*"):
        try:
            st = f.lstat()  # the entry itself: a link is never followed, nor removed
        except OSError:  # its writer renamed or removed it meanwhile
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        pid = f.name[len(ours) :].split("-", 1)[0] if f.name.startswith(ours) else ""
        dead = False
        if pid.isdigit():  # from this machine (a shared cache folder may serve others): is its writer alive?
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                dead = True
            except PermissionError:  # alive, another user's
                pass
        try:
            if dead or now - st.st_mtime > _STALE_TEMP_S:
                f.unlink()
        except OSError:  # removed meanwhile, or another user's file in a shared folder: not ours to force
            pass


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _record(tmp: Path, ds) -> bytes:
    """The record of what a complete tokenized file holds, checked whenever the file is read back."""
    record = {
        "rows": len(ds),
        "tokens": int(sum(ds["length"])),
        "bytes": tmp.stat().st_size,
        "sha256": _sha256_file(tmp),
    }
    return json.dumps(record).encode()


def _read_cache(path: Path):
    """The cached dataset at `path` if it is there and is exactly what was written; None to tokenize (again)."""
    import datasets

    if not path.exists():
        return None
    side = path.with_suffix(".json")
    problem = None
    try:
        record = json.loads(side.read_text())
        size = path.stat().st_size
        if size != record["bytes"]:
            problem = f"{size:,} bytes where {record['bytes']:,} were written"
        elif _sha256_file(path) != record["sha256"]:
            problem = "its checksum differs from the one recorded when it was written"
        else:
            ds = datasets.Dataset.from_file(str(path))
            tokens = int(sum(ds["length"]))
            if (len(ds), tokens) != (record["rows"], record["tokens"]):
                problem = f"{len(ds):,} rows and {tokens:,} tokens where {record['rows']:,} and {record['tokens']:,}"
            else:
                return ds
    except FileNotFoundError:
        problem = f"no record of its contents ({side.name} is missing: a run stopped while writing it?)"
    except Exception as e:  # unreadable record or file: anything but the cache's own word is a rebuild
        problem = f"unreadable: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    rank_zero_info(f"[phi3lit] cache: {path} is damaged ({problem}); tokenizing again, not training on it")
    return None


def _features():
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    n = datasets.Value("int32")
    return datasets.Features(
        {
            "input_ids": ids,
            "labels": ids,
            "length": n,
            "full_length": n,
            "trained": n,
            "outcome": datasets.Value("string"),
        }
    )


def _write_tokenized(conversations: list, encode, tmp: Path, name: str) -> None:
    """Tokenize `conversations` with `encode`, 1,000 at a time, into the Arrow file `tmp` (new), fsync'ed."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter
    from datasets.utils import tqdm

    with create_new(tmp) as f, tqdm(total=len(conversations), desc=f"tokenize {name}", unit=" examples") as bar:
        writer = ArrowWriter(features=_features(), stream=pa.PythonFile(f, mode="w"))
        for start in range(0, len(conversations), 1000):  # one record batch each, as datasets' `map` writes
            batch = conversations[start : start + 1000]
            writer.write_batch(encode({"messages": batch}))
            bar.update(len(batch))
        writer.finalize(close_stream=False)
        f.flush()
        os.fsync(f.fileno())


def _unwritable(cache: Path, error: OSError) -> EnvironmentProblem:
    why = error.strerror or str(error).splitlines()[0][:160] or type(error).__name__
    return EnvironmentProblem(
        f"--data.cache_dir {cache}: cannot write the tokenized data there ({why}); nothing was left there. Free "
        "space there, or point --data.cache_dir at a folder with room"
    )


def tokenize_cached(conversations: list, tokenizer, settings: dict, cache: Path, name: str):
    """The tokenized dataset of `conversations` (one row per conversation: `_features()`), read from `cache` when
    there, else tokenized with `tokenize_example` under `settings` and written there. Returns (dataset, how many
    conversations were tokenized now: 0 when the cache had them). A cache folder that cannot be written (full,
    read-only) raises `EnvironmentProblem`, with this run's temporary files removed."""
    import datasets

    key = cache_key(conversations, tokenizer, **settings)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(cache, e) from None
    calls = [0]

    def encode(batch):
        calls[0] += len(batch["messages"])
        out = {k: [] for k in _features()}
        for messages in batch["messages"]:
            example, outcome, full = tokenize_example(messages, tokenizer, **settings)
            ids, labels = (example["input_ids"], example["labels"]) if example else ([], [])
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["full_length"].append(full)
            out["trained"].append(sum(x != IGNORE_INDEX for x in labels))
            out["outcome"].append(outcome)
        return out

    _remove_stale_temp_files(cache)
    path = cache / f"{key}.arrow"
    ds = _read_cache(path)
    if not conversations:  # e.g. everything held out for validation
        ds = datasets.Dataset.from_dict({k: [] for k in _features()}, features=_features())
    elif ds is None:
        # Both files are written under this process's temporary names, fsync'ed and renamed into place, the data
        # before its record (the inner rename runs first), so a record always describes a complete file.
        tmp, side_tmp = (cache / f"{_temp_prefix()}{key}{suffix}" for suffix in (".arrow", ".json"))
        try:
            with atomic_file(path.with_suffix(".json"), temp=side_tmp) as side, atomic_path(path, temp=tmp):
                _write_tokenized(conversations, encode, tmp, name)
                side.write(_record(tmp, datasets.Dataset.from_file(str(tmp))))
            ds = datasets.Dataset.from_file(str(path))
        except OSError as e:  # disk full, quota, read-only: this run's temporary files are gone, the message stays
            raise _unwritable(cache, e) from None
    return ds, calls[0]
