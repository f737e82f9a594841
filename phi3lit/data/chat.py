"""Chat rendering and the loss mask: a conversation -> token ids and labels.

`tokenize_chat` renders a conversation with the tokenizer's chat template and labels only what the model should
learn to say: each assistant reply's content and the special token that closes it (`<|end|>` for Phi-3, so the
model learns to stop). Spans are found by character offsets of the rendered text. The template is rendered once
with placeholders in place of each message's content, which tells us exactly which characters are the template's
own (role headers, `<|end|>`) and which are message content. Only the template's own special-token text becomes
special tokens; content is encoded with special-token parsing off, so a message that contains the literal text
`<|end|>` or `<|assistant|>` can never forge a turn. Text between two special tokens is encoded in one piece, which
is how Phi-3's tokenizer (and sentencepiece) treat it anyway: `<|user|>\\nHi` gives `▁ \\n Hi`.

`tokenize_example` applies the truncation policy to conversations longer than `max_length`: `truncate` keeps the
start and cuts at a turn boundary, keeping the most whole turns that end with an assistant reply (the shorter
conversation is rendered again, so it ends as the template ends it); if even the first reply does not fit, it keeps
the first `max_length` tokens up to and into that reply, as long as at least one reply token survives, and
otherwise skips the example (`skipped_too_long`). A row therefore never ends on a dangling role header. `drop`
drops every overlong example (`dropped`). Before any of this, content far past `max_length` tokens' worth of
characters is cut off (`bound_messages`), with exactly the ids, labels and outcome of the whole conversation, so
the tokenizer's memory per example is bounded whatever the input.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Sequence
from typing import Literal, NamedTuple

from phi3lit.data.labels import IGNORE_INDEX
from phi3lit.errors import ConfigError, DataError

# Outcomes of `tokenize_example`; the ones not kept are counted under these names in the stats.
KEPT, TRUNCATED, DROPPED, TOO_LONG, NO_REPLY = "kept", "truncated", "dropped", "too_long", "no_reply"
# Private-use code points: never produced by a chat template, never in real text we care about.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


# ---------------------------------------------------------------------------- templates without a system role
_PROBE = [{"role": "system", "content": "\x00phi3lit-system\x00"}, {"role": "user", "content": "u"}]


_SYSTEM_ROLE: dict[tuple[int, str], bool] = {}


def system_role_supported(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system message at all (Phi-3-medium's does not)."""
    key = (id(tokenizer), str(tokenizer.chat_template))
    if key not in _SYSTEM_ROLE:  # rendered once per tokenizer and template, not once per example
        try:
            text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
        except Exception:  # a template that raises on a system message (Gemma-style) has no system role either
            text = ""
        _SYSTEM_ROLE[key] = _PROBE[0]["content"] in text
    return _SYSTEM_ROLE[key]


def render_system_message(
    messages: Sequence[dict[str, str]], tokenizer, policy: str = "fold", where: str = "data"
) -> list[dict[str, str]]:
    """Messages the template renders completely: a system message must not vanish silently.

    With a template that has a system role, `messages` is returned as it is. Otherwise (Phi-3-medium), a leading
    system message is folded into the first user turn (`<system>\\n\\n<user>`, what the Phi-3 cookbook does for
    templates without a system role), with a warning (`policy="fold"`), or refused (`policy="error"`).
    """
    if not messages or messages[0]["role"] != "system" or not messages[0]["content"]:
        return list(messages)
    if system_role_supported(tokenizer):
        return list(messages)
    if policy == "error":
        raise ConfigError(
            f"{where}: this model's chat template has no system role (Phi-3-medium): the system message would be "
            "dropped. Remove it, or fold it into the first user turn (data.system_message: fold)"
        )
    warnings.warn(
        "the chat template has no system role (Phi-3-medium): the system message is folded into the first user turn",
        stacklevel=2,
    )
    system, rest = messages[0]["content"], list(messages[1:])
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {**m, "content": f"{system}\n\n{m['content']}"}
            return rest
    return [{"role": "user", "content": system}, *rest]


def _special_token_pattern(tokenizer) -> re.Pattern:
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len)
    return re.compile("|".join(re.escape(s) for s in reversed(specials)))  # longest first


def encode_chat(
    messages: Sequence[dict[str, str]], tokenizer, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation, and which of them are assistant replies or their closing token."""
    messages = render_system_message(messages, tokenizer)  # Phi-3-medium has no system role: fold it, warn
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


# A cut point in message content: just after a character other than a space, tab or newline that one of those
# follows. No Phi-3 token (nor one of the tiny tokenizer's) has such a pair inside it, so no BPE merge crosses such a
# point and the text before it tokenizes exactly as it does inside the whole text.
_WORD_END = re.compile(r"[^ \t\n](?=[ \t\n])")
_CUT_MARGIN = 64  # characters past the bound, so that even the first token after it is whole
_LONGEST_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> longest token, in characters


def longest_token_chars(tokenizer) -> int:
    """The most characters one token can cover: the longest token string in the vocabulary.

    A sentencepiece token string maps 1:1 to characters (`▁` for a space); a byte-level one has one character per
    byte, and a character is at least one byte. Byte-fallback pieces (`<0x0A>`) only overstate it. Assumes the
    normalizer deletes no characters (Phi-3's only prepends `▁` and maps spaces to it).
    """
    if tokenizer not in _LONGEST_TOKEN:  # once per tokenizer, not once per example (32,064 strings)
        _LONGEST_TOKEN[tokenizer] = max(1, max(map(len, tokenizer.get_vocab()), default=1))
    return _LONGEST_TOKEN[tokenizer]


def bound_messages(
    messages: Sequence[dict[str, str]], max_length: int, longest_token: int
) -> tuple[list[dict[str, str]], bool, bool]:
    """The start of a conversation that is enough to tokenize its first `max_length` tokens exactly.

    The first `max_length` tokens cover at most `max_length * longest_token` characters of message content, so
    content beyond that (plus a margin) cannot change them: it is cut at the first word end past the bound, and
    later messages are left out. A word end is looked for up to the bound again; a run of characters without a
    space longer than that is cut inside, where only BPE merges near the cut could differ, a bound away from the
    tokens kept. A cut conversation still has more than `max_length` tokens, so every truncation decision is the
    same as for the whole one. The cut is at the right because `truncation` keeps the start; a mode that keeps the
    end would have to cut at the left. Returns (messages, whether anything was cut, whether a left-out message was
    a reply). This bounds the tokenizer's memory whatever the input: tokenizing a 50 MB message whole took 18 GB.
    """
    bound = max_length * longest_token + _CUT_MARGIN
    kept, used = [], 0
    for k, m in enumerate(messages):
        content = m["content"]
        if used + len(content) <= bound:
            kept.append(m)
            used += len(content)
            continue
        start = bound - used
        end = _WORD_END.search(content, start, start + bound)
        cut = end.end() if end else min(len(content), start + bound)
        if cut < len(content):  # else the message ends inside the window: a special token follows it anyway
            m = {**m, "content": content[:cut]}
        rest = messages[k + 1 :]
        return [*kept, m], True, any(r["role"] == "assistant" for r in rest)
    return kept, False, False


def tokenize_example(
    messages: Sequence[dict[str, str]],
    tokenizer,
    max_length: int,
    train_on: Literal["assistant", "all"] = "assistant",
    truncation: Literal["truncate", "drop"] = "truncate",
) -> Tokenized:
    """Tokenize one training conversation under the truncation policy (see the module docstring).

    Content far beyond `max_length` tokens is cut first (`bound_messages`), with the same ids, labels and outcome
    as the whole conversation; `full_length` of a cut conversation counts only what was kept (still over
    `max_length`).
    """
    messages, _, reply_cut_off = bound_messages(messages, max_length, longest_token_chars(tokenizer))
    return _tokenize_whole(messages, tokenizer, max_length, train_on, truncation, reply_cut_off)


def _tokenize_whole(
    messages: Sequence[dict[str, str]],
    tokenizer,
    max_length: int,
    train_on: Literal["assistant", "all"] = "assistant",
    truncation: Literal["truncate", "drop"] = "truncate",
    reply_cut_off: bool = False,
) -> Tokenized:
    """`tokenize_example` on the whole conversation, however long (`reply_cut_off`: a reply was cut off after it)."""
    ids, reply = encode_chat(messages, tokenizer)
    out, full = _labelled(ids, reply, train_on), len(ids)
    if all(x == IGNORE_INDEX for x in out["labels"]) and not reply_cut_off:
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
