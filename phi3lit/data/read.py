"""Reading examples: local .json / .jsonl / .parquet files and hub datasets, with line-precise errors.

`read_conversations` turns every example into `{role, content}` messages through its layout (`formats.py`) and
applies the bad-example policy: an error naming the file and line, or a counted skip.
"""

from __future__ import annotations

import json
import re
import stat
import sys
from collections import Counter
from pathlib import Path
from typing import Literal, NamedTuple

from phi3lit.data.formats import LAYOUTS, detect_format, to_messages
from phi3lit.errors import BadExample, DataError


def _json_list_lines(text: str) -> list[int]:
    """1-based line of each top-level element of a JSON list (`text` is known to parse as a list)."""
    decoder, ws = json.JSONDecoder(), re.compile(r"[\s,]*")
    lines, line, last = [], 1, 0
    pos = ws.match(text, 0).end() + 1  # past the opening bracket
    while True:
        pos = ws.match(text, pos).end()
        if text[pos] == "]":
            return lines
        line += text.count("\n", last, pos)
        last = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)


def _read_text(path: Path) -> str:
    """A data file's text: UTF-8, with or without a byte-order mark (Windows tools write one)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None


def _too_deep(where: str) -> DataError:
    return DataError(
        f"{where}: JSON nested too deeply to read (more than {sys.getrecursionlimit():,} levels of [ or {{); an "
        "example is an object of messages: fix or remove it"
    )


def _loads(text: str, where: str) -> object:
    """`json.loads`, with nesting deeper than Python's stack allows as a `DataError` naming `where`."""
    try:
        return json.loads(text)
    except RecursionError:  # json nests one Python call per level; a file can nest deeper than the stack allows
        raise _too_deep(where) from None


def _read_json_rows(path: Path) -> list[tuple[str, object]]:
    """(location, row) pairs from a JSON list or JSONL file, with line-precise errors."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        if text.lstrip().startswith("["):  # JSON Lines has one object per line; a list is a .json file
            raise DataError(
                f"{path}: holds a JSON array, not JSON Lines (one example object per line); rename it to "
                f"{path.with_suffix('.json').name} to read it as a JSON list of examples"
            )
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", _loads(line, f"{path}:{lineno}")))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        return rows
    try:
        data = _loads(text, str(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    # A second, position-only pass so that messages can name the line of a pretty-printed list's element.
    try:
        lines = _json_list_lines(text)
    except RecursionError:  # as deep as json.loads just managed, from a few calls deeper
        raise _too_deep(str(path)) from None
    return [(f"{path}:{line} (row {i})", row) for i, (line, row) in enumerate(zip(lines, data, strict=True))]


_NOT_A_FILE = {
    stat.S_IFDIR: "a folder", stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
}  # fmt: skip


def _check_file(path: Path, source: str) -> None:
    """A data file must be a regular file. Only its status is read, so a named pipe never blocks the run; a link the
    user made to their file is followed (reading it is fine; phi3lit never writes there)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        broken = " (a symbolic link to a missing file)" if path.is_symlink() else ""
        raise DataError(f"{source}: no such data file{broken}") from None
    except OSError as e:
        raise DataError(f"{source}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        what = _NOT_A_FILE.get(stat.S_IFMT(mode), "not a regular file")
        if stat.S_ISDIR(mode):
            todo = "name a .jsonl, .json or .parquet file in it"
        else:  # a pipe would block until something writes to it, and reads only once
            todo = "copy what it gives to a file and name that"
        raise DataError(f"{source}: is {what}, not a data file; {todo}")


def _read_parquet_rows(path: Path) -> list[tuple[str, object]]:
    import datasets
    import pyarrow.parquet as pq

    try:  # its footer first, before datasets builds anything from it
        pq.ParquetFile(path).close()
        ds = datasets.Dataset.from_parquet(str(path))
    except Exception as e:  # pyarrow's ArrowInvalid (no magic bytes, bad footer or pages), an OSError, ...
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise DataError(
            f"{path}: not a readable Parquet file ({first}); write it with pandas, pyarrow or datasets"
        ) from None
    return [(f"{path} row {i}", row) for i, row in enumerate(ds)]


def _read_rows(source: str, split: str, config: str | None = None) -> list[tuple[str, object]]:
    path = Path(source)
    if path.suffix in (".json", ".jsonl"):
        _check_file(path, source)
        return _read_json_rows(path)
    if path.suffix == ".parquet":
        _check_file(path, source)
        return _read_parquet_rows(path)
    import datasets  # anything else is a hub dataset name

    ds = datasets.load_dataset(source, config, split=split)
    name = f"{source}[{config}]" if config else source
    return [(f"{name}[{split}] row {i}", row) for i, row in enumerate(ds)]


class Conversations(NamedTuple):
    conversations: list[list[dict[str, str]]]
    skipped: dict[str, int]  # bad-example kind -> examples skipped (on_bad_example: skip)
    first_skip: dict[str, str]  # bad-example kind -> the first such example's message, for the log
    locations: tuple[str, ...] = ()  # "file:line" / "file row N" of each conversation, for error messages


def read_conversations(
    source: str,
    split: str = "train",
    format: str = "auto",
    config: str | None = None,
    on_bad_example: Literal["error", "skip"] = "error",
) -> Conversations:
    """Conversations from a local .json/.jsonl/.parquet file or a hub dataset (name, `config`, `split`).

    `format` names the layout or, `auto`, detects it from the first example. Examples that break the content
    policy raise `DataError` (`on_bad_example: error`) or are counted in `skipped` (`skip`).
    """
    if format != "auto" and format not in LAYOUTS:
        raise ValueError(f"format must be one of {', '.join(('auto', *LAYOUTS))}, got {format!r}")
    rows = _read_rows(source, split, config)
    if not rows:
        raise DataError(f"{source}: no examples")
    fmt = detect_format(rows[0][1], rows[0][0]) if format == "auto" else format
    conversations, skipped, first, locations = [], Counter(), {}, []
    for where, row in rows:
        try:
            conversations.append(to_messages(row, fmt, where))
            locations.append(where)
        except BadExample as e:
            if on_bad_example == "error":
                raise DataError(f"{e} (data.on_bad_example=skip skips and counts such examples)") from None
            skipped[e.problem] += 1
            first.setdefault(e.problem, str(e))
    if not conversations:
        raise DataError(f"{source}: no usable examples; all {len(rows)} were skipped ({dict(skipped)})")
    return Conversations(conversations, dict(skipped), first, tuple(locations))


def load_conversations(
    source: str,
    split: str = "train",
    format: str = "auto",
    config: str | None = None,
    on_bad_example: Literal["error", "skip"] = "error",
) -> list[list[dict[str, str]]]:
    """Conversations from a local .json/.jsonl/.parquet file or a hub dataset; see `read_conversations`."""
    return read_conversations(source, split, format, config, on_bad_example).conversations
