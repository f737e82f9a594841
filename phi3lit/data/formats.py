"""Data layouts: one example (a JSON object) -> checked `{role, content}` messages.

A layout is one function `(row, where) -> messages` plus one entry in `LAYOUTS` saying which rows it claims (for
`data.format: auto`, which looks at the first example) and which fields it needs (for the error message). Adding a
layout is exactly that: write the function, add the entry; `data.format` accepts every name in `LAYOUTS`.

- `messages`: OpenAI / Hugging Face chat data, `{"messages": [{"role", "content"}, ...]}` with roles `system`,
  `user`, `assistant`.
- `sharegpt`: `{"conversations": [{"from", "value"}, ...], "system": "..."}`. `from` may be `system`, `human` or
  `user`, `gpt`, `assistant` or `model`. The optional top-level `system` becomes a first system message. Turns
  written as `{"role", "content"}` are read too.
- `alpaca`: `{"instruction", "input", "output", "system"}`: the user turn is the instruction, then a blank line and
  the input when there is one; the reply is the output. Prompt-completion data (`{"prompt", "completion"}`) is read
  by the same layout; either field may also be a list of messages, as in TRL's conversational prompt-completion
  data. A missing output or completion leaves a prompt with no reply (fine for `predict`; for training such an
  example is skipped as having nothing to train).

Content may be a string or a list of `{"type": "text", "text": ...}` parts, joined with newlines (as vLLM does); any
other part type (an image, say) is an error naming the example, message and part.

**Bad examples.** A file that cannot be what it claims (not JSON, a field missing or of the wrong type, an empty
conversation, a non-text content part) always stops the run with the file and line or row. Three problems are about
one example's content instead, and follow `data.on_bad_example` (`BadExample.problem` is one of `BAD_KINDS`):

- an unknown role (`tool`, `function_call`, a typo);
- an empty assistant reply (empty or only whitespace): there is nothing to learn and it teaches the model to stop
  at once;
- a conversation that does not alternate: an optional system message first, then `user`, `assistant`, `user`, ...
  starting with `user` (it may end with either).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from phi3lit.errors import BadExample, DataError

ROLES = ("system", "user", "assistant")
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


def detect_format(row: object, where: str) -> str:
    """The layout of an example from its fields: the first in `LAYOUTS` that claims it."""
    if isinstance(row, dict):
        for name, layout in LAYOUTS.items():
            if layout.claims(row):
                return name
        fields = ", ".join(repr(k) for k in row) or "none"
    else:
        fields = f"a {type(row).__name__}, not an object"
    expected = ", ".join(f"{layout.needs} ({name})" for name, layout in LAYOUTS.items())
    raise DataError(
        f"{where}: cannot tell the data layout (fields: {fields}); expected {expected}; data.format names it"
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
    out = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = row.get(key)
        if isinstance(value, list):  # conversational prompt-completion (TRL)
            out += _turns(value, where, key, "role", "content", {r: r for r in ROLES})
        elif value is not None:
            out.append({"role": role, "content": _field(row, key, where), "at": repr(key)})
    return out


class Layout(NamedTuple):
    read: Callable[[dict, str], list[dict]]  # (row, where) -> messages with role (None if unknown), content, at
    claims: Callable[[dict], bool]  # does a row have this layout's fields (for data.format: auto)
    needs: str  # the fields it needs, for messages


# The layouts `data.format` accepts, in the order `auto` tries them.
LAYOUTS: dict[str, Layout] = {
    "messages": Layout(_messages_layout, lambda row: "messages" in row, "'messages'"),
    "sharegpt": Layout(_sharegpt_layout, lambda row: "conversations" in row, "'conversations'"),
    "alpaca": Layout(_alpaca_layout, lambda row: "instruction" in row or "prompt" in row, "'instruction' or 'prompt'"),
}


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
    layout = LAYOUTS[fmt]
    if not layout.claims(row):
        raise DataError(f"{where}: example has no {layout.needs} field ({fmt} layout)")
    messages = layout.read(row, where)
    for m in messages:
        _check_unicode(m["content"], f"{where}: {m['at']}")
    check_policy(messages, where)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_messages(messages: object, where: str) -> list[dict[str, str]]:
    """Validate one `messages` list (every problem is an error); keep only role and content."""
    return to_messages({"messages": messages}, "messages", where)
