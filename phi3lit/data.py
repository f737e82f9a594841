"""Chat data: load, render the chat template, mask, truncate, pack, cache.

The subtle steps are pure functions with their own tests:

* `read_conversations` reads a local .json/.jsonl/.parquet file or a hub dataset and turns every example into
  a list of `{role, content}` messages. Three layouts are understood, detected from the first example
  (`format: auto`) or named (`format: messages|sharegpt|alpaca`):

  - `messages`: OpenAI / Hugging Face chat data, `{"messages": [{"role", "content"}, ...]}` with roles
    `system`, `user`, `assistant`.
  - `sharegpt`: `{"conversations": [{"from", "value"}, ...], "system": "..."}`. `from` may be `system`,
    `human` or `user`, `gpt`, `assistant` or `model`. The optional top-level `system` becomes a first system
    message. Turns written as `{"role", "content"}` are read too.
  - `alpaca`: `{"instruction", "input", "output", "system"}`: the user turn is the instruction, then a blank
    line and the input when there is one; the reply is the output. Prompt-completion data
    (`{"prompt", "completion"}`) is read by the same layout; either field may also be a list of messages,
    as in TRL's conversational prompt-completion data. A missing output or completion leaves a prompt with
    no reply (fine for `predict`; for training such an example is skipped as having nothing to train).

  Content may be a string or a list of `{"type": "text", "text": ...}` parts, joined with newlines (as vLLM
  does); any other part type (an image, say) is an error naming the example, message and part.

  **Bad examples.** A file that cannot be what it claims (not JSON, a field missing or of the wrong type,
  an empty conversation, a non-text content part) always stops the run with the file and line or row.
  Three problems are about one example's content instead, and follow `on_bad_example`:

  - an unknown role (`tool`, `function_call`, a typo);
  - an empty assistant reply (empty or only whitespace): there is nothing to learn and it teaches the
    model to stop at once;
  - a conversation that does not alternate: an optional system message first, then `user`, `assistant`,
    `user`, ... starting with `user` (it may end with either).

  `on_bad_example: error` (the default) stops with the location and the problem, e.g.
  `data.jsonl:17: message 2 has role 'tool'; expected one of system, user, assistant`; `skip` drops the
  example, counts it in `stats[split]["skipped_unknown_role" | "skipped_empty_reply" |
  "skipped_not_alternating"]` and logs the first location of each kind.
  Examples with nothing to train (no assistant reply) are always skipped and counted (`skipped_no_reply`):
  they are the normal case for prompt files.

* `tokenize_chat` renders a conversation with the tokenizer's chat template and labels only what the
  model should learn to say: each assistant reply's content and the special token that closes it
  (`<|end|>` for Phi-3, so the model learns to stop). Spans are found by character offsets of the
  rendered text. The template is rendered once with placeholders in place of each message's content,
  which tells us exactly which characters are the template's own (role headers, `<|end|>`) and which
  are message content. Only the template's own special-token text becomes special tokens; content is
  encoded with special-token parsing off, so a message that contains the literal text `<|end|>` or
  `<|assistant|>` can never forge a turn. Text between two special tokens is encoded in one piece, which
  is how Phi-3's tokenizer (and sentencepiece) treat it anyway: `<|user|>\\nHi` gives `▁ \\n Hi`.
* `tokenize_example` applies the truncation policy to conversations longer than `max_length`:
  `truncate` keeps the start and cuts at a turn boundary, keeping the most whole turns that end with an
  assistant reply (the shorter conversation is rendered again, so it ends as the template ends it); if
  even the first reply does not fit, it keeps the first `max_length` tokens up to and into that reply,
  as long as at least one reply token survives, and otherwise skips the example (`skipped_too_long`).
  A row therefore never ends on a dangling role header. `drop` drops every overlong example (`dropped`).
* `pack_rows` places conversations into rows of at most `max_length` tokens, best-fit decreasing. Validation and
  test conversations are placed in a seeded random order instead (plain best fit), so that the first rows, all
  that a `limit_val_batches` scores, are a fair sample and not the longest conversations; that order is fixed for
  the run, so every validation scores the same subset.
* `collate` turns rows into `input_ids`, `labels` and `position_ids` that restart at 0 for every
  conversation. There is no `attention_mask`: given `position_ids`, no mask and no KV cache,
  transformers builds the block-causal mask itself, so packed conversations never see each other.
  Padding uses the `<unk>` id (0) and is masked by position (label -100, its own position run),
  never by token id.

Tokenization runs once per (conversations, tokenizer, settings, this file's code): `ChatDataModule` tokenizes
through `datasets.Dataset.map` into an Arrow file under `cache_dir` named by a hash of all of those, and a
later run with the same inputs loads that file instead of tokenizing again. Packed rows read their
conversations from the memory-mapped file, so a large dataset never sits in Python lists. The file is written
under a temporary name, fsync'ed and renamed into place; then a small `<key>.json` beside it records its rows,
tokens, size and sha256. A cache file that does not match its record (truncated, altered, or without one) is
never read: it is tokenized again, with one log line naming it. Temporary files that killed runs left behind
are removed once their process is gone or they are 15 minutes old.

Training order is exact across resumes: the position in an epoch is kept as positions of the epoch's global
order (see `ResumableSampler`), so a run may resume with another batch size or number of devices. Checkpoints
also keep a fingerprint of the data, the split and the order settings (`ChatDataModule.state_dict`); resuming
`fit` with different ones is refused with the list of differences unless `accept_changes` is set.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import math
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler

from phi3lit.errors import CheckpointError, ConfigError, missing_model
from phi3lit.tiny import cache_root, resolve_pretrained

IGNORE_INDEX = -100  # torch cross-entropy's ignore_index
ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "messages", "sharegpt", "alpaca")
# ShareGPT speaker names, including the OpenAI and Gemini spellings some converters write.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}
# Kinds of bad example that `on_bad_example` governs; each is counted as `skipped_<kind>` when skipped.
BAD_KINDS = ("unknown_role", "empty_reply", "not_alternating")
# Outcomes of `tokenize_example`; the ones not kept are counted under these names in the stats.
KEPT, TRUNCATED, DROPPED, TOO_LONG, NO_REPLY = "kept", "truncated", "dropped", "too_long", "no_reply"
# Private-use code points: never produced by a chat template, never in real text we care about.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


class DataError(ValueError):
    """Bad input data. The message names the file and the line or row."""


class BadExample(DataError):
    """One example breaks the content policy (`BAD_KINDS`): an error or a counted skip, per `on_bad_example`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------- reading
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
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    # A second, position-only pass so that messages can name the line of a pretty-printed list's element.
    lines = _json_list_lines(text)
    return [(f"{path}:{line} (row {i})", row) for i, (line, row) in enumerate(zip(lines, data, strict=True))]


def _read_rows(source: str, split: str, config: str | None = None) -> list[tuple[str, object]]:
    path = Path(source)
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise DataError(f"{source}: no such data file")
        return _read_json_rows(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise DataError(f"{source}: no such data file")
        import datasets

        ds = datasets.Dataset.from_parquet(str(path))
        return [(f"{path} row {i}", row) for i, row in enumerate(ds)]
    import datasets  # anything else is a hub dataset name

    ds = datasets.load_dataset(source, config, split=split)
    name = f"{source}[{config}]" if config else source
    return [(f"{name}[{split}] row {i}", row) for i, row in enumerate(ds)]


# ---------------------------------------------------------------------------- layouts
def detect_format(row: object, where: str) -> str:
    """The layout of an example from its fields: `messages`, `sharegpt` or `alpaca`."""
    if isinstance(row, dict):
        if "messages" in row:
            return "messages"
        if "conversations" in row:
            return "sharegpt"
        if "instruction" in row or "prompt" in row:
            return "alpaca"
        fields = ", ".join(repr(k) for k in row) or "none"
    else:
        fields = f"a {type(row).__name__}, not an object"
    raise DataError(
        f"{where}: cannot tell the data layout (fields: {fields}); expected 'messages' (role/content), "
        "'conversations' (ShareGPT from/value), 'instruction'/'output' or 'prompt'/'completion' (Alpaca); "
        "data.format names it"
    )


def _text_of(content: object, where: str) -> str:
    """Message content as a string: a string, or a list of text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise DataError(
                    f"{where} content part {k} is of type {kind!r}; only {{'type': 'text', 'text': ...}} parts "
                    "are supported"
                )
            if not isinstance(part.get("text"), str):
                raise DataError(f"{where} content part {k} is a text part without a string 'text'")
            texts.append(part["text"])
        return "\n".join(texts)
    raise DataError(f"{where} content must be a string or a list of text parts, got {type(content).__name__}")


def _turns(raw: object, where: str, what: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    """Structurally checked messages: `role` (None if unknown), `content`, and `at`, where it is in the example.

    An unknown role is not an error yet: `check_policy` decides, with the message kept in `bad`.
    """
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: {what!r} must be a non-empty list of {{{role_key}, {text_key}}} objects")
    out = []
    for j, m in enumerate(raw):
        at = f"message {j}" if what == "messages" else f"turn {j}" if what == "conversations" else f"{what} turn {j}"
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise DataError(f"{where}: {at} needs both {role_key!r} and {text_key!r}")
        role = roles.get(m[role_key]) if isinstance(m[role_key], str) else None
        out.append({"role": role, "content": _text_of(m[text_key], f"{where}: {at}"), "at": at})
        if role is None:
            known = ", ".join(dict.fromkeys(roles))
            out[-1]["bad"] = f"{where}: {at} has {role_key} {m[role_key]!r}; expected one of {known}"
    return out


def _messages_layout(row: dict, where: str) -> list[dict]:
    return _turns(row["messages"], where, "messages", "role", "content", {r: r for r in ROLES})


def _sharegpt_layout(row: dict, where: str) -> list[dict]:
    turns = row["conversations"]
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" not in turns[0]:
        out = _turns(turns, where, "conversations", "role", "content", SHAREGPT_ROLES)
    else:
        out = _turns(turns, where, "conversations", "from", "value", SHAREGPT_ROLES)
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: 'system' must be a string, got {type(system).__name__}")
    if system:  # an empty top-level system means none
        out.insert(0, {"role": "system", "content": system, "at": "the top-level 'system'"})
    return out


def _field(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _alpaca_layout(row: dict, where: str) -> list[dict]:
    if "instruction" in row:
        instruction = _field(row, "instruction", where) or ""
        extra = _field(row, "input", where)
        system, output = _field(row, "system", where), _field(row, "output", where)
        out = [{"role": "system", "content": system, "at": "'system'"}] if system else []
        out.append({"role": "user", "content": instruction + ("\n\n" + extra if extra else ""), "at": "'instruction'"})
        return out + ([{"role": "assistant", "content": output, "at": "'output'"}] if output is not None else [])
    if "prompt" not in row:
        raise DataError(f"{where}: example has neither an 'instruction' nor a 'prompt' field (Alpaca layout)")
    out = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = row.get(key)
        if isinstance(value, list):  # conversational prompt-completion (TRL)
            out += _turns(value, where, key, "role", "content", {r: r for r in ROLES})
        elif value is not None:
            out.append({"role": role, "content": _field(row, key, where), "at": repr(key)})
    return out


_LAYOUTS = {"messages": _messages_layout, "sharegpt": _sharegpt_layout, "alpaca": _alpaca_layout}
_REQUIRED = {"messages": "'messages'", "sharegpt": "'conversations'", "alpaca": "'instruction' or 'prompt'"}


def _check_unicode(text: str, where: str) -> None:
    """Refuse a lone surrogate (JSON allows the escape "\\ud800" without its pair): it is no character, and neither
    the tokenizer nor the cache can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where} has a lone surrogate {text[e.start]!r} at character {e.start} (half of a UTF-16 pair, e.g. "
            "from a JSON escape): not valid Unicode text; fix or remove the example"
        ) from None


def check_policy(messages: list[dict], where: str) -> None:
    """Raise `BadExample` for the first unknown role, non-alternating turn or empty reply."""
    expected = "user"
    for j, m in enumerate(messages):
        role = m["role"]
        if role is None:
            raise BadExample("unknown_role", m["bad"])
        if not (role == expected or (j == 0 and role == "system")):
            raise BadExample(
                "not_alternating",
                f"{where}: {m['at']} is {role!r} where {expected!r} was expected; turns must alternate user, "
                "assistant, user, ... after an optional first system message",
            )
        if role == "assistant" and not m["content"].strip():
            raise BadExample("empty_reply", f"{where}: {m['at']} is an empty assistant reply")
        expected = "assistant" if role == "user" else "user"


def to_messages(row: object, fmt: str, where: str) -> list[dict[str, str]]:
    """One example in layout `fmt` as checked `{role, content}` messages.

    Raises `DataError` for a malformed example and `BadExample` for one that breaks the content policy.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: example must be a JSON object, got {type(row).__name__}")
    if fmt != "alpaca" and ("messages" if fmt == "messages" else "conversations") not in row:
        raise DataError(f"{where}: example has no {_REQUIRED[fmt]} field ({fmt} layout)")
    messages = _LAYOUTS[fmt](row, where)
    for m in messages:
        _check_unicode(m["content"], f"{where}: {m['at']}")
    check_policy(messages, where)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_messages(messages: object, where: str) -> list[dict[str, str]]:
    """Validate one `messages` list (every problem is an error); keep only role and content."""
    return to_messages({"messages": messages}, "messages", where)


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
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
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
            skipped[e.kind] += 1
            first.setdefault(e.kind, str(e))
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


# ---------------------------------------------------------------------------- tokenize + mask
def _special_token_pattern(tokenizer) -> re.Pattern:
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len)
    return re.compile("|".join(re.escape(s) for s in reversed(specials)))  # longest first


def encode_chat(
    messages: Sequence[dict[str, str]], tokenizer, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation, and which of them are assistant replies or their closing token."""
    placeholders = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
    scaffold = tokenizer.apply_chat_template(placeholders, tokenize=False, add_generation_prompt=add_generation_prompt)
    special = _special_token_pattern(tokenizer)

    ids: list[int] = []
    reply: list[bool] = []
    segment, spans = "", []  # plain text since the last special token; assistant content spans in it
    close_next = False  # the next special token closes an assistant reply: train on it

    def flush():
        nonlocal segment, spans, close_next
        if segment:
            enc = tokenizer(segment, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
            for tok, (start, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
                ids.append(tok)
                reply.append(any(a <= start < b for a, b in spans))
            close_next = bool(spans) and segment[spans[-1][1] :].strip() == ""
        segment, spans = "", []

    def add_scaffold(text: str):
        nonlocal segment, close_next
        pos = 0
        for m in special.finditer(text):
            segment += text[pos : m.start()]
            if segment.strip():  # template text between reply and special token: not a closing token
                close_next = False
            flush()
            ids.append(tokenizer.convert_tokens_to_ids(m.group()))
            reply.append(close_next)
            close_next = False
            pos = m.end()
        segment += text[pos:]

    pos = 0
    for m in _SENTINEL_RE.finditer(scaffold):
        add_scaffold(scaffold[pos : m.start()])
        msg = messages[int(m.group(1))]
        if msg["role"] == "assistant":
            spans.append((len(segment), len(segment) + len(msg["content"])))
        segment += msg["content"]
        pos = m.end()
    add_scaffold(scaffold[pos:])
    flush()
    return ids, reply


def _labelled(ids: list[int], reply: list[bool], train_on: str) -> dict[str, list[int]]:
    labels = [tok if (r or train_on == "all") else IGNORE_INDEX for tok, r in zip(ids, reply, strict=True)]
    labels[0] = IGNORE_INDEX  # nothing precedes the first token; in a packed row it must not be predicted
    return {"input_ids": ids, "labels": labels}


def tokenize_chat(
    messages: Sequence[dict[str, str]],
    tokenizer,
    max_length: int | None = None,
    train_on: Literal["assistant", "all"] = "assistant",
    add_generation_prompt: bool = False,
) -> dict[str, list[int]]:
    """Render `messages` with the chat template; label assistant content plus its closing token.

    Returns `input_ids` and `labels` (-100 where not trained), cut to the first `max_length` tokens
    (a plain cut: `tokenize_example` applies the truncation policy that training uses).
    `add_generation_prompt` ends the text with the assistant header instead of `<|endoftext|>` (prompts).
    """
    out = _labelled(*encode_chat(messages, tokenizer, add_generation_prompt), train_on)
    if max_length is not None:
        out = {k: v[:max_length] for k, v in out.items()}
    return out


class Tokenized(NamedTuple):
    example: dict[str, list[int]] | None  # input_ids and labels, None when the conversation is left out
    outcome: str  # kept, truncated (with an example); dropped, too_long, no_reply (without)
    full_length: int  # tokens before truncation


def tokenize_example(
    messages: Sequence[dict[str, str]],
    tokenizer,
    max_length: int,
    train_on: Literal["assistant", "all"] = "assistant",
    truncation: Literal["truncate", "drop"] = "truncate",
) -> Tokenized:
    """Tokenize one training conversation under the truncation policy (see the module docstring)."""
    ids, reply = encode_chat(messages, tokenizer)
    out, full = _labelled(ids, reply, train_on), len(ids)
    if all(x == IGNORE_INDEX for x in out["labels"]):
        return Tokenized(None, NO_REPLY, full)
    if full <= max_length:
        return Tokenized(out, KEPT, full)
    if truncation == "drop":
        return Tokenized(None, DROPPED, full)
    # The longest prefix of whole turns that ends with a reply. Lengths grow with the prefix, so bisect.
    ends = [k + 1 for k, m in enumerate(messages) if m["role"] == "assistant"]
    best, lo, hi = None, 0, len(ends) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        enc = encode_chat(messages[: ends[mid]], tokenizer)
        if len(enc[0]) <= max_length:
            best, lo = enc, mid + 1
        else:
            hi = mid - 1
    if best is not None:
        return Tokenized(_labelled(*best, train_on), TRUNCATED, full)
    if not ends:  # train_on: all without any reply: no turn boundary that keeps a reply
        return Tokenized(None, TOO_LONG, full)
    # Even the first reply does not fit: keep its start, if any of it survives (so no dangling header).
    ids, reply = encode_chat(messages[: ends[0]], tokenizer)
    ids, reply = ids[:max_length], reply[:max_length]
    if not any(reply[1:]):
        return Tokenized(None, TOO_LONG, full)
    return Tokenized(_labelled(ids, reply, train_on), TRUNCATED, full)


# ---------------------------------------------------------------------------- packing
def pack_rows(lengths: Sequence[int], max_length: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Best-fit decreasing: indices of sequences grouped into rows of at most `max_length` tokens.

    Each sequence, longest first, goes into the open row with the least room that still fits it.
    Deterministic: ties keep input order. With `order` (a permutation of the indices), sequences are placed in
    that order instead (plain best fit): rows are then a sample of the sequences rather than sorted by length,
    at a small cost in packing.
    """
    if order is None:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"sequence {i} has {n} tokens > max_length {max_length}")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            room, r = max_length - n, len(rows) - 1
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


def loss_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions (row * T + t) of a (rows, T) batch whose next token, t + 1 in the same row, is trained."""
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols


def collate(rows: Sequence[Sequence[dict[str, list[int]]]], pad_id: int = 0, multiple_of: int = 8) -> dict:
    """Rows of packed conversations -> `input_ids`, `labels`, `position_ids` (B, T) tensors.

    Positions restart at 0 for each conversation; the padding tail is one more run of positions, so
    it is its own block in the block-causal mask and never attended to by real tokens. `cu_seq_lens` holds
    the same blocks as cumulative offsets over the flattened rows (int32, what varlen attention kernels take),
    `doc_offsets` the same as a list (for `phi3lit.attention`; a list stays on the host when Lightning moves
    the batch to a GPU, so reading it never waits for the device) and `max_seq_len` the longest block.
    `loss_index` lists the flat positions whose next token is trained, so the model picks them with
    `index_select` instead of a boolean mask (whose size a GPU would have to report to the host). Two
    bookkeeping fields ride along, never given to the model: `real_tokens` (non-padding tokens, for
    throughput) and `sources` (where each conversation came from, for error messages).
    """
    width = max(sum(len(c["input_ids"]) for c in row) for row in rows)
    width = -(-width // multiple_of) * multiple_of  # round up: fewer distinct shapes for kernels
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    blocks = []  # lengths of the conversations and padding runs, row after row
    for b, row in enumerate(rows):
        t = 0
        for conv in row:
            n = len(conv["input_ids"])
            input_ids[b, t : t + n] = torch.tensor(conv["input_ids"])
            labels[b, t : t + n] = torch.tensor(conv["labels"])
            position_ids[b, t : t + n] = torch.arange(n)
            blocks.append(n)
            t += n
        position_ids[b, t:] = torch.arange(width - t)
        if width > t:
            blocks.append(width - t)
    offsets = [0, *itertools.accumulate(blocks)]
    real = sum(len(c["input_ids"]) for row in rows for c in row)
    sources = [c["source"] for row in rows for c in row if "source" in c]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seq_lens": torch.tensor(offsets, dtype=torch.int32),
        "doc_offsets": offsets,  # the same, as a list: it stays on the host when the batch moves to a GPU
        "loss_index": loss_index(labels),  # found here, on the host, not on a GPU
        "max_seq_len": max(blocks),
        "real_tokens": real,
        "sources": sources,
    }


# ---------------------------------------------------------------------------- loaders
def _deal(indices: list[int], num_replicas: int, rank: int, drop_last: bool = False) -> list[int]:
    """Rank `rank`'s share of a global order, exactly as DistributedSampler deals it: positions rank, rank + W, ...
    after padding the order to a multiple of W by repeating it from the start (or cutting it, with drop_last)."""
    if not indices:
        return []
    if drop_last:
        indices = indices[: len(indices) - len(indices) % num_replicas]
    else:
        total = math.ceil(len(indices) / num_replicas) * num_replicas
        indices = (indices * math.ceil(total / len(indices)))[:total]
    return indices[rank::num_replicas]


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way through, for exact mid-epoch resume.

    The position is counted in the epoch's global order (the one permutation of all rows per (seed, epoch) that
    DistributedSampler draws; rank r reads positions r, r + W, ...), so a run can resume on another number of
    ranks or with another batch size: the rows not yet read are dealt to the new ranks the same way. An epoch
    that is not resumed is exactly DistributedSampler's.
    """

    resume: tuple[int, int] | None = None  # (epoch, positions of that epoch's global order already read)

    def global_order(self) -> list[int]:
        """This epoch's order of all rows, before padding and dealing (DistributedSampler's)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(len(self.dataset), generator=g).tolist()
        return list(range(len(self.dataset)))

    def left(self, skip: int) -> int:
        """Rows this rank reads in an epoch whose first `skip` positions were read already."""
        rest = max(0, len(self.dataset) - skip)
        if self.drop_last:
            return rest // self.num_replicas
        return math.ceil(rest / self.num_replicas)

    def __iter__(self):
        resume, self.resume = self.resume, None
        if resume is None or resume[0] != self.epoch:
            return super().__iter__()
        rest = self.global_order()[min(resume[1], len(self.dataset)) :]
        return iter(_deal(rest, self.num_replicas, self.rank, self.drop_last))


class ResumableLoader(DataLoader):
    """Lightning saves `state_dict()` in checkpoints and calls `load_state_dict()` on resume.

    The state is the epoch, the number of batches the training loop has processed in it (taken from the loop, not
    from this iterator, which Lightning prefetches ahead) and `samples`, how many positions of the epoch's global
    order those batches read on all ranks together. A resumed run reads exactly the rows an uninterrupted run
    would have read next, whatever its batch size and number of ranks. States without `samples` (older
    checkpoints) are read as taken with the current batch size and ranks.
    """

    trainer = None
    # (epoch, batches, samples) this loader resumed from: the loop keeps counting batches from there, in batches
    # of the new size, so positions read since then are counted from it.
    _base: tuple[int, int, int] | None = None

    def _per_batch(self) -> int:
        return self.batch_size * self.sampler.num_replicas  # positions of the global order one micro-batch reads

    def state_dict(self) -> dict:
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0
        epoch, base = self.sampler.epoch, self._base
        if base is not None and base[0] == epoch and done >= base[1]:
            samples = base[2] + (done - base[1]) * self._per_batch()
        else:
            samples = done * self._per_batch()
        return {"epoch": epoch, "batches": done, "samples": samples}

    def load_state_dict(self, state: dict) -> None:
        samples = state.get("samples", state["batches"] * self._per_batch())
        self.sampler.resume = (state["epoch"], samples)
        self._base = (state["epoch"], state["batches"], samples)

    def __len__(self) -> int:
        # Lightning ends an epoch after len() batches, counting on from the batches the checkpoint had processed.
        # After a resume with a larger batch size or more ranks, those were smaller batches, so make room for all
        # the batches left (a length too large is harmless: the epoch also ends when the sampler runs out).
        n = super().__len__()
        if self.sampler.resume is not None and self._base is not None:
            n = max(n, self._base[1] + math.ceil(self.sampler.left(self.sampler.resume[1]) / self.batch_size))
        return n


# ---------------------------------------------------------------------------- tokenize once
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
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # any change here invalidates the cache


def cache_key(conversations: Sequence[Sequence[dict[str, str]]], tokenizer, **settings) -> str:
    """The name of a tokenized dataset: a hash of the conversations, tokenizer, settings and this file's code.

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


# ---------------------------------------------------------------------------- cache integrity
# A run's temporary files in the cache folder: `tmp-<host>-<pid>-<key>.arrow` (ours) and `tmp*` (datasets' own, while
# it writes). Left behind by killed runs; removed when their process is gone or they have not changed for this long.
_STALE_TEMP_S = 15 * 60  # a live writer touches its file at every batch of 1,000 examples, far more often


def _temp_prefix() -> str:
    return f"tmp-{socket.gethostname()}-{os.getpid()}-"


def _remove_stale_temp_files(cache: Path) -> None:
    ours, now = f"tmp-{socket.gethostname()}-", time.time()
    for f in cache.glob("tmp*"):
        pid = f.name[len(ours) :].split("-", 1)[0] if f.name.startswith(ours) else ""
        dead = False
        if pid.isdigit():  # ours, from this machine (a shared cache folder may serve others): is its writer alive?
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                dead = True
            except PermissionError:  # alive, another user's
                pass
        try:
            if dead or now - f.stat().st_mtime > _STALE_TEMP_S:
                f.unlink()
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            pass


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: Path, data: bytes | None = None) -> None:
    """Write `data` (or just flush an existing file) to `path` and fsync it."""
    with open(path, "r+b" if data is None else "wb") as f:
        if data is not None:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish_cache(tmp: Path, path: Path, ds):
    """Move a complete tokenized file into place, then record what it holds beside it; return it, re-opened."""
    import datasets

    _fsync_write(tmp)
    record = {
        "rows": len(ds),
        "tokens": int(sum(ds["length"])),
        "bytes": tmp.stat().st_size,
        "sha256": _sha256_file(tmp),
    }
    os.replace(tmp, path)
    side = path.with_suffix(".json")
    side_tmp = path.parent / f"{_temp_prefix()}{side.name}"
    _fsync_write(side_tmp, json.dumps(record).encode())
    os.replace(side_tmp, side)  # written after the data: a record always describes a complete file
    _fsync_dir(path.parent)
    return datasets.Dataset.from_file(str(path))


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


# Settings that decide which conversations train and validate, and in what order, kept in checkpoints to compare
# on resume. Not batch_size (a resume may change it) nor anything the data digests already cover.
_FINGERPRINT_SETTINGS = ("seed", "val_fraction", "val_file", "max_length", "train_on", "truncation", "format")


def _data_digest(conversations: Sequence) -> str:
    return f"{len(conversations)} conversations, sha256 {conversations_digest(conversations)[:16]}"


class PackedRows(Sequence):
    """Packed rows read on demand from a tokenized (memory-mapped) dataset: `rows[r]` is a list of conversations."""

    def __init__(self, dataset, index: list[list[int]], locations: list[str] | None = None):
        self.dataset = dataset.select_columns(["input_ids", "labels"])
        self.index = index
        self.locations = locations

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, r: int) -> list[dict[str, list[int]]]:
        cols = self.dataset[self.index[r]]
        convs = [{"input_ids": i, "labels": lab} for i, lab in zip(cols["input_ids"], cols["labels"], strict=True)]
        if self.locations is not None:
            for conv, i in zip(convs, self.index[r], strict=True):
                conv["source"] = self.locations[i]
        return convs


def _percentile(sorted_values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of an ascending sequence."""
    k = max(0, -(-len(sorted_values) * p // 100) - 1)
    return sorted_values[int(k)]


# ---------------------------------------------------------------------------- datamodule
class ChatDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_fraction: float = 0.05,
        test_file: str | None = None,
        predict_file: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        tokenizer: str = "",
        max_length: int = 1024,
        train_on: Literal["assistant", "all"] = "assistant",
        batch_size: int = 4,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        format: Literal["auto", "messages", "sharegpt", "alpaca"] = "auto",
        hub_config: str | None = None,
        on_bad_example: Literal["error", "skip"] = "error",
        truncation: Literal["truncate", "drop"] = "truncate",
        cache_dir: str | None = None,
    ):
        """
        Args:
            train_file: .json/.jsonl/.parquet file, or a hub dataset name, of chat examples (see `format`).
            val_file: separate validation data; if None, `val_fraction` of `train_file` is held out.
            val_fraction: share of the training conversations held out for validation when no `val_file`.
            test_file: data for `python -m phi3lit test`.
            predict_file: conversations to answer with `python -m phi3lit predict`; trailing assistant turns are
                dropped and the model writes the next reply.
            split: split to read from a hub dataset.
            val_split: split of `val_file` when it is a hub dataset (default: `split`).
            tokenizer: tokenizer folder or hub id. Linked to `model.pretrained` by the CLI.
            max_length: tokens per packed row; longer conversations follow `truncation`. Linked to the model.
            train_on: `assistant` trains on replies and their `<|end|>`; `all` on every token (model card).
            batch_size: packed rows per micro-batch.
            num_workers: DataLoader worker processes (collation is cheap; measured in experiments/bench).
            pin_memory: page-locked batches, so the copy to a GPU runs asynchronously; None: on when training
                on CUDA, off on CPU, where it would only cost a copy.
            seed: seed of the train/validation split and of the per-epoch row order.
            format: layout of every data file: `messages` ({"messages": [{role, content}]}), `sharegpt`
                ({"conversations": [{from, value}], "system"}), `alpaca` ({instruction, input, output} or
                {prompt, completion}), or `auto` to tell from each file's first example.
            hub_config: configuration (subset) name of hub datasets, e.g. `en` of a multilingual dataset.
            on_bad_example: an example with an unknown role, an empty assistant reply or turns that do not
                alternate user/assistant: `error` stops with its file and line; `skip` skips and counts it.
            truncation: conversations longer than `max_length`: `truncate` keeps the start, cut after the last
                whole reply that fits (or inside the first reply if none fits); `drop` leaves them out.
            cache_dir: where tokenized datasets are cached (default: `tokenized/` in phi3lit's cache,
                `~/.cache/phi3lit` or `$PHI3LIT_CACHE`). A rerun with the same data, tokenizer and settings
                reads the cache instead of tokenizing again.
        """
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2, got {max_length}")
        for name, value, allowed in (  # the CLI checks these Literals; direct Python callers get the same message
            ("train_on", train_on, ("assistant", "all")),
            ("format", format, FORMATS),
            ("on_bad_example", on_bad_example, ("error", "skip")),
            ("truncation", truncation, ("truncate", "drop")),
        ):
            if value not in allowed:
                raise ConfigError(f"data.{name} must be one of {', '.join(allowed)}, got {value!r}")
        self.save_hyperparameters(logger=False)  # the CLI logs the whole resolved config instead
        self.tokenizer = None
        self.rows: dict[str, Sequence] = {}
        self.stats: dict[str, dict[str, int]] = {}
        self.tokenized: dict = {}  # split -> tokenized `datasets.Dataset`, one row per example, for `describe`
        self._train_loader: ResumableLoader | None = None  # the latest, for `state_dict`
        self._position: dict | None = None  # a checkpoint's training position, until the train loader exists
        self._fingerprint: dict | None = None  # the data, split and order settings of `fit`, kept in checkpoints
        # Resume even if the checkpoint's fingerprint differs (the CLI's --accept_changes sets it).
        self.accept_changes = False

    def load_tokenizer(self):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.hparams.tokenizer))
            except OSError as e:
                raise missing_model(self.hparams.tokenizer, e) from None
            if self.hparams.train_on == "assistant":
                missing = [t for t in ("<|assistant|>", "<|end|>", "<|user|>") if t not in self.tokenizer.get_vocab()]
                if missing or not self.tokenizer.chat_template:
                    raise ConfigError(
                        f"data.train_on=assistant needs a tokenizer with Phi-3's chat tokens and chat template; "
                        f"{self.hparams.tokenizer!r} lacks {', '.join(missing) or 'a chat template'}. Use a Phi-3 "
                        "tokenizer, or data.train_on=all"
                    )
        return self.tokenizer

    def _read(self, source: str, split: str) -> Conversations:
        hp = self.hparams
        return read_conversations(source, split, hp.format, hp.hub_config, hp.on_bad_example)

    def _tokenize(
        self, conversations: list, name: str, bad: Conversations | None = None, locations: list[str] | None = None
    ) -> PackedRows:
        """Tokenize (or load from the cache) with HF datasets, drop what cannot be trained, pack into rows.

        `bad` carries the examples skipped while reading, which count against this split.
        """
        import datasets

        tok, hp = self.load_tokenizer(), self.hparams
        settings = {"max_length": hp.max_length, "train_on": hp.train_on, "truncation": hp.truncation}
        key = cache_key(conversations, tok, **settings)
        cache = Path(hp.cache_dir) if hp.cache_dir else cache_root() / "tokenized"
        cache.mkdir(parents=True, exist_ok=True)
        calls = [0]  # conversations tokenized by this call: 0 when the cache had them

        def encode(batch):
            calls[0] += len(batch["messages"])
            out = {k: [] for k in _features()}
            for messages in batch["messages"]:
                example, outcome, full = tokenize_example(messages, tok, **settings)
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
        if not conversations:  # e.g. everything held out for validation; `map` would drop the columns
            ds = datasets.Dataset.from_dict({k: [] for k in _features()}, features=_features())
        elif ds is None:
            tmp = cache / f"{_temp_prefix()}{key}.arrow"  # renamed into place only once complete and on disk
            ds = datasets.Dataset.from_dict({"messages": conversations}).map(
                encode,
                batched=True,
                remove_columns=["messages"],
                features=_features(),
                cache_file_name=str(tmp),
                load_from_cache_file=False,
                new_fingerprint=key,
                desc=f"tokenize {name}",
            )
            ds = _publish_cache(tmp, path, ds)
        self.tokenized[name] = ds
        outcomes = list(ds["outcome"])
        lengths, trained = list(ds["length"]), list(ds["trained"])
        kept = [i for i, o in enumerate(outcomes) if o in (KEPT, TRUNCATED)]
        order = None
        if name in ("val", "test"):
            # Best-fit decreasing would put the longest conversations in the first rows, which are all that a
            # `limit_val_batches` scores (evaluation is never shuffled). Placing them in a seeded random order,
            # fixed for the run, makes any first rows a fair sample, and the same one at every validation.
            order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(hp.seed)).tolist()
        packed = pack_rows([lengths[i] for i in kept], hp.max_length, order)
        rows = PackedRows(ds, [[kept[j] for j in row] for row in packed], locations)

        counts = Counter(outcomes)
        loaded = bad.skipped if bad else {}
        skipped = {f"skipped_{k}": loaded.get(k, 0) for k in BAD_KINDS}
        skipped |= {"skipped_no_reply": counts[NO_REPLY], "skipped_too_long": counts[TOO_LONG]}
        real = sum(lengths[i] for i in kept)
        stats = {
            "examples": len(outcomes) + sum(loaded.values()),
            "conversations": len(kept),
            "truncated": counts[TRUNCATED],
            "dropped": counts[DROPPED],
            "skipped": sum(skipped.values()),
            **skipped,
            "rows": len(rows),
            "tokens": real,  # the same as real_tokens; the original name
            "real_tokens": real,
            "trained_tokens": sum(trained[i] for i in kept),
            "slots": len(rows) * hp.max_length,
            "tokenized": calls[0],
        }
        self.stats[name] = stats
        rank_zero_info(self._summary(name, stats))
        for kind, message in (bad.first_skip if bad else {}).items():
            rank_zero_info(f"[phi3lit] {name}: skipped {loaded[kind]} example(s) ({kind}); the first: {message}")
        return rows

    def _summary(self, name: str, s: dict[str, int]) -> str:
        slots = max(1, s["slots"])
        why = ", ".join(f"{k[len('skipped_') :]} {v}" for k, v in s.items() if k.startswith("skipped_") and v)
        return (
            f"[phi3lit] {name}: {s['examples']} examples -> {s['conversations']} conversations "
            f"({s['truncated']} truncated); skipped {s['skipped']}{f' ({why})' if why else ''}, dropped "
            f"{s['dropped']} (over {self.hparams.max_length} tokens) -> {s['rows']} packed rows, "
            f"{s['real_tokens'] / slots:.1%} real / {s['trained_tokens'] / slots:.1%} trained tokens per slot; "
            + (f"tokenized {s['tokenized']} now" if s["tokenized"] else "token ids read from the cache")
        )

    def _nothing_to_train(self, s: dict[str, int], held_out: int) -> str:
        hp = self.hparams
        why = ", ".join(f"{k[len('skipped_') :]} {v}" for k, v in s.items() if k.startswith("skipped_") and v)
        total = s["examples"] + held_out
        return (
            f"{hp.train_file}: nothing to train on: {total} examples, {held_out} held out for validation, "
            f"{s['skipped']} skipped{f' ({why})' if why else ''}, {s['dropped']} dropped (over data.max_length="
            f"{hp.max_length} tokens) -> 0 packed training rows. Check data.max_length, data.truncation (truncate "
            "keeps the start of long conversations), data.on_bad_example, data.val_fraction, and that examples "
            "have assistant replies"
        )

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage in ("fit", "validate") and "train" not in self.rows:
            read = self._read(hp.train_file, hp.split)
            train, train_at, val_bad = read.conversations, read.locations, None
            if hp.val_file:
                val_bad = self._read(hp.val_file, hp.val_split or hp.split)
                val, val_at = val_bad.conversations, val_bad.locations
            else:
                g = torch.Generator().manual_seed(hp.seed)
                perm = torch.randperm(len(train), generator=g).tolist()
                n_val = max(1, round(hp.val_fraction * len(train))) if hp.val_fraction > 0 else 0
                val, val_at = [train[i] for i in perm[:n_val]], [train_at[i] for i in perm[:n_val]]
                keep = sorted(perm[n_val:])
                train, train_at = [train[i] for i in keep], [train_at[i] for i in keep]
            self._fingerprint = {
                **{k: hp[k] for k in _FINGERPRINT_SETTINGS},
                "train_data": _data_digest(train),
                "val_data": _data_digest(val),
            }
            # Examples skipped while reading a file that is then split count against the training split.
            self.rows["train"] = self._tokenize(train, "train", read, train_at)
            self.rows["val"] = self._tokenize(val, "val", val_bad, val_at) if val else []
            if stage == "fit" and self.trainer is not None and not self.rows["train"]:
                # Lightning would skip an empty epoch, save an untrained adapter and exit 0.
                held_out = 0 if hp.val_file else len(val)
                raise DataError(self._nothing_to_train(self.stats["train"], held_out))
        if stage == "test" and "test" not in self.rows:
            if not hp.test_file:
                raise DataError("data.test_file is not set; `test` needs a test file")
            read = self._read(hp.test_file, hp.split)
            self.rows["test"] = self._tokenize(read.conversations, "test", read, read.locations)

        if stage == "predict" and "predict" not in self.rows:
            if not hp.predict_file:
                raise DataError("data.predict_file is not set; `predict` needs prompts")
            conversations = self._read(hp.predict_file, hp.split).conversations
            self.rows["predict"] = [(prompt_of(c), reference_of(c)) for c in conversations]

    def _pin_memory(self) -> bool:
        if self.hparams.pin_memory is not None:
            return self.hparams.pin_memory
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        trainer = self.trainer
        # Order depends only on (seed, epoch): Lightning calls set_epoch, restores the epoch on resume and
        # keeps a DistributedSampler under DDP, where each rank reads a disjoint shard.
        sampler = ResumableSampler(
            self.rows[name],
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=shuffle,
            seed=self.hparams.seed,
            drop_last=False,
        )
        loader = ResumableLoader(
            self.rows[name],
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            # Pad with <unk> (id 0 in Phi-3), never eos; padding is masked by position anyway.
            collate_fn=functools.partial(collate, pad_id=self.tokenizer.unk_token_id or 0),
            num_workers=self.hparams.num_workers,
            pin_memory=self._pin_memory(),
            generator=torch.Generator().manual_seed(self.hparams.seed),  # keep the global RNG untouched
        )
        loader.trainer = trainer
        if name in ("val", "test"):
            self._log_limited(name, sampler)
        return loader

    def _log_limited(self, name: str, sampler: DistributedSampler) -> None:
        """Say exactly what a `limit_val_batches` / `limit_test_batches` below the whole split scores."""
        key = f"limit_{name}_batches"
        limit = getattr(self.trainer, key, None)
        rows, bs = self.rows[name], self.hparams.batch_size
        batches = math.ceil(sampler.num_samples / bs)  # per rank; drop_last is off
        if limit is None or batches == 0:
            return
        # Lightning's reading of the limit: an int caps the batches per rank, a float is a share of them.
        scored = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        if scored >= batches:
            return
        padded = [i % len(rows) for i in range(sampler.total_size)]  # DistributedSampler repeats the first rows
        seen = set()
        for rank in range(sampler.num_replicas):  # rank r reads rows r, r + W, ... of the (fixed) order
            seen.update(padded[rank :: sampler.num_replicas][: scored * bs])
        convs = sum(len(rows.index[i]) for i in seen)
        total = sum(len(r) for r in rows.index)
        rank_zero_info(
            f"[phi3lit] {name}: {key}={limit} scores {len(seen)} of {len(rows)} packed rows (a seeded random subset"
            f"{', the same at every validation' if name == 'val' else ''}): {convs} of {total} conversations"
        )

    def train_dataloader(self):
        loader = self._loader("train", shuffle=True)
        if self._position is not None:  # before Lightning takes the loader's length: see ResumableLoader.__len__
            loader.load_state_dict(self._position)
            epoch, done = loader.sampler.resume
            rank_zero_info(
                f"[phi3lit] train: resuming epoch {epoch} after {min(done, len(self.rows['train']))} of its "
                f"{len(self.rows['train'])} packed rows; the rest in batches of {self.hparams.batch_size} on "
                f"{loader.sampler.num_replicas} device(s)"
            )
            self._position = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict:
        """Saved in checkpoints by Lightning: the training position (as the loader's own state, which Lightning also
        saves but restores only after it has taken the loader's length) and the fingerprint of the data, the split
        and the order settings."""
        state = {}
        if self._train_loader is not None:
            state["train_position"] = self._train_loader.state_dict()
        if self._fingerprint is not None:
            state["fingerprint"] = dict(self._fingerprint)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Called by Lightning on resume, after `setup` and before `train_dataloader`.

        Resuming `fit` on other data, another split or order (a different fingerprint) raises `CheckpointError`
        listing each difference, unless `accept_changes` is set. `batch_size` and the number of devices may change.
        """
        fitting = self.trainer is not None and getattr(self.trainer.state, "fn", None) == "fit"
        saved = state.get("fingerprint")
        if fitting and saved and self._fingerprint and not self.accept_changes:
            changed = [
                f"data.{k}: checkpoint {saved.get(k)!r}, now {v!r}"
                for k, v in self._fingerprint.items()
                if k in saved and saved[k] != v
            ]
            if changed:
                raise CheckpointError(
                    "the checkpoint was trained on other data or data settings, so resuming would not continue "
                    f"its data order: {'; '.join(changed)}. Pass --accept_changes true to resume anyway"
                )
        self._position = state.get("train_position")

    def val_dataloader(self):
        return self._loader("val", shuffle=False) if self.rows.get("val") else []

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def predict_dataloader(self):
        from phi3lit.generate import left_pad  # generate.py imports this module

        tok = self.load_tokenizer()

        def collate_prompts(rows):  # left padding, so every reply starts right after its prompt
            prompts, references = zip(*rows, strict=True)
            ids = [tokenize_chat(p, tok, add_generation_prompt=True)["input_ids"] for p in prompts]
            input_ids, attention_mask = left_pad(ids, tok.unk_token_id or 0)
            return {
                "input_ids": input_ids, "attention_mask": attention_mask, "messages": list(prompts),
                "references": list(references),
            }  # fmt: skip

        return DataLoader(self.rows["predict"], batch_size=self.hparams.batch_size, collate_fn=collate_prompts)


def reference_of(messages: list[dict[str, str]]) -> str | None:
    """The reply a conversation already has after its last user turn (what `predict` is compared with), if any."""
    trailing = []
    for m in reversed(messages):
        if m["role"] != "assistant":
            break
        trailing.append(m["content"])
    return "\n".join(reversed(trailing)) if trailing else None


def prompt_of(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to its last user turn: what the model is asked to answer."""
    end = len(messages)
    while end > 0 and messages[end - 1]["role"] == "assistant":
        end -= 1
    if end == 0:
        raise DataError("a predict prompt has no user turn")
    return list(messages[:end])


# ---------------------------------------------------------------------------- inspection
def render_trained(ids: Sequence[int], labels: Sequence[int], tokenizer, mark: tuple[str, str] = ("[[", "]]")) -> str:
    """The decoded conversation with every run of trained tokens wrapped in `mark`.

    Runs are cut out of decoded prefixes rather than decoded alone, because a tokenizer may decode a piece
    differently on its own (sentencepiece drops the space of a leading `▁`).
    """
    decode = functools.partial(tokenizer.decode, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    trained = [x != IGNORE_INDEX for x in labels]
    cuts = [0] + [i for i in range(1, len(ids)) if trained[i] != trained[i - 1]] + [len(ids)]
    out, done = [], ""
    for a, b in itertools.pairwise(cuts):
        text = decode(list(ids[:b]))
        piece = text[len(done) :] if text.startswith(done) else decode(list(ids[a:b]))
        done = text
        out.append(f"{mark[0]}{piece}{mark[1]}" if trained[a] else piece)
    return "".join(out)


def describe(dm: ChatDataModule, split: str = "train", example: int | str = 0) -> str:
    """A printable report on one split: counts, lengths, packing, and one example with trained tokens in [[ ]].

    Sets the data module up for the split if needed. `example` indexes the split's examples as tokenized
    (after the validation hold-out and anything skipped while reading), or picks one: `longest` (before
    truncation) or `truncated` (the one that lost the most tokens to max_length).
    """
    stages = {"train": "fit", "val": "fit", "test": "test"}
    if split not in stages:
        raise ValueError(f"split must be one of {', '.join(stages)}, got {split!r}")
    if split not in dm.rows:
        dm.setup(stages[split])
    hp = dm.hparams
    source = {"train": hp.train_file, "val": hp.val_file or f"{hp.train_file} (held out)", "test": hp.test_file}
    lines = [
        f"phi3lit data: {split} split of {source[split]}",
        f"  settings       format {hp.format}, max_length {hp.max_length}, train_on {hp.train_on}, "
        f"truncation {hp.truncation}, on_bad_example {hp.on_bad_example}",
    ]
    if split not in dm.stats or not len(dm.tokenized[split]):
        return "\n".join([*lines, "  no examples"])
    s, ds = dm.stats[split], dm.tokenized[split]
    slots = max(1, s["slots"])
    why = ", ".join(f"{k[len('skipped_') :]} {v}" for k, v in s.items() if k.startswith("skipped_"))
    full = sorted(ds["full_length"])
    pct = ", ".join(f"p{p} {_percentile(full, p):,}" for p in (50, 90, 99))
    over = sum(n > hp.max_length for n in full)
    cached = f"{s['tokenized']:,} conversations now" if s["tokenized"] else "read from the cache"
    lines += [
        f"  examples       {s['examples']:,}",
        f"  kept           {s['conversations']:,} conversations, {s['truncated']:,} of them truncated",
        f"  skipped        {s['skipped']:,} ({why})",
        f"  dropped        {s['dropped']:,}",
        f"  tokens         {s['real_tokens']:,} real, {s['trained_tokens']:,} trained",
        f"  length         {pct}, max {full[-1]:,} tokens before truncation; {over:,} over max_length",
        f"  packing        {s['rows']:,} rows x {hp.max_length:,} = {s['slots']:,} slots: "
        f"{s['real_tokens'] / slots:.1%} real, {s['trained_tokens'] / slots:.1%} trained",
        f"  tokenized      {cached}",
    ]
    if example in ("longest", "truncated"):
        full, kept = list(ds["full_length"]), list(ds["length"])
        lost = [f - k if o == TRUNCATED else -1 for f, k, o in zip(full, kept, ds["outcome"], strict=True)]
        score = full if example == "longest" else lost
        if example == "truncated" and max(score, default=-1) < 0:
            return "\n".join([*lines, "", "no example was truncated"])
        example = max(range(len(score)), key=score.__getitem__)
    if not isinstance(example, int) or not 0 <= example < len(ds):
        return "\n".join([*lines, f"example {example}: out of range (0..{len(ds) - 1})"])
    row = ds[example]
    before = f" ({row['full_length']:,} before truncation)" if row["outcome"] == TRUNCATED else ""
    head = f"example {example}: {row['outcome']}, {row['length']:,} tokens{before}, {row['trained']:,} trained"
    if not row["input_ids"]:
        return "\n".join([*lines, "", f"{head} (left out of training, so nothing to show)"])
    text = render_trained(row["input_ids"], row["labels"], dm.load_tokenizer())
    return "\n".join([*lines, "", f"{head}; trained tokens are inside [[ ]]:", text])
