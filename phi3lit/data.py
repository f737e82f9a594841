"""Chat data: load, render the chat template, mask, pack.

The three subtle steps are pure functions with their own tests:

* `tokenize_chat` renders a conversation with the tokenizer's chat template and labels only what the
  model should learn to say: each assistant reply's content and the special token that closes it
  (`<|end|>` for Phi-3, so the model learns to stop). Spans are found by character offsets of the
  rendered text. The template is rendered once with placeholders in place of each message's content,
  which tells us exactly which characters are the template's own (role headers, `<|end|>`) and which
  are message content. Only the template's own special-token text becomes special tokens; content is
  encoded with special-token parsing off, so a message that contains the literal text `<|end|>` or
  `<|assistant|>` can never forge a turn. Text between two special tokens is encoded in one piece, which
  is how Phi-3's tokenizer (and sentencepiece) treat it anyway: `<|user|>\\nHi` gives `▁ \\n Hi`.
* `pack_rows` places conversations into rows of at most `max_length` tokens, best-fit decreasing.
* `collate` turns rows into `input_ids`, `labels` and `position_ids` that restart at 0 for every
  conversation. There is no `attention_mask`: given `position_ids`, no mask and no KV cache,
  transformers builds the block-causal mask itself, so packed conversations never see each other.
  Padding uses the `<unk>` id (0) and is masked by position (label -100, its own position run),
  never by token id.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler

from phi3lit.tiny import resolve_pretrained

IGNORE_INDEX = -100  # torch cross-entropy's ignore_index
ROLES = ("system", "user", "assistant")
# Private-use code points: never produced by a chat template, never in real text we care about.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


class DataError(ValueError):
    """Bad input data. The message names the file and the line or row."""


# ---------------------------------------------------------------------------- loading
def _read_json_rows(path: Path) -> list[tuple[str, object]]:
    """(location, row) pairs from a JSON list or JSONL file, with line-precise errors."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
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
    return [(f"{path} row {i}", row) for i, row in enumerate(data)]


def _read_rows(source: str, split: str) -> list[tuple[str, object]]:
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

    ds = datasets.load_dataset(source, split=split)
    return [(f"{source}[{split}] row {i}", row) for i, row in enumerate(ds)]


def check_messages(messages: object, where: str) -> list[dict[str, str]]:
    """Validate one conversation; keep only role and content."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {j} needs both 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {j} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {j} content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def load_conversations(source: str, split: str = "train") -> list[list[dict[str, str]]]:
    """Conversations from a local .json/.jsonl/.parquet file or a hub dataset (name + split)."""
    conversations = []
    for where, row in _read_rows(source, split):
        if not isinstance(row, dict) or "messages" not in row:
            raise DataError(f"{where}: example has no 'messages' field")
        conversations.append(check_messages(row["messages"], where))
    if not conversations:
        raise DataError(f"{source}: no examples")
    return conversations


# ---------------------------------------------------------------------------- tokenize + mask
def _special_token_pattern(tokenizer) -> re.Pattern:
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len)
    return re.compile("|".join(re.escape(s) for s in reversed(specials)))  # longest first


def tokenize_chat(
    messages: Sequence[dict[str, str]],
    tokenizer,
    max_length: int | None = None,
    train_on: Literal["assistant", "all"] = "assistant",
    add_generation_prompt: bool = False,
) -> dict[str, list[int]]:
    """Render `messages` with the chat template; label assistant content plus its closing token.

    Returns `input_ids` and `labels` (-100 where not trained), truncated to `max_length` tokens.
    `add_generation_prompt` ends the text with the assistant header instead of `<|endoftext|>` (prompts).
    """
    placeholders = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
    scaffold = tokenizer.apply_chat_template(placeholders, tokenize=False, add_generation_prompt=add_generation_prompt)
    special = _special_token_pattern(tokenizer)

    ids: list[int] = []
    labels: list[int] = []
    segment, spans = "", []  # plain text since the last special token; assistant content spans in it
    close_next = False  # the next special token closes an assistant reply: train on it

    def flush():
        nonlocal segment, spans, close_next
        if segment:
            enc = tokenizer(segment, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
            for tok, (start, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
                ids.append(tok)
                trained = train_on == "all" or any(a <= start < b for a, b in spans)
                labels.append(tok if trained else IGNORE_INDEX)
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
            tok = tokenizer.convert_tokens_to_ids(m.group())
            ids.append(tok)
            labels.append(tok if (close_next or train_on == "all") else IGNORE_INDEX)
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

    labels[0] = IGNORE_INDEX  # nothing precedes the first token; in a packed row it must not be predicted
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


# ---------------------------------------------------------------------------- packing
def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: indices of sequences grouped into rows of at most `max_length` tokens.

    Each sequence, longest first, goes into the open row with the least room that still fits it.
    Deterministic: ties keep input order.
    """
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


def collate(rows: Sequence[Sequence[dict[str, list[int]]]], pad_id: int = 0, multiple_of: int = 8) -> dict:
    """Rows of packed conversations -> `input_ids`, `labels`, `position_ids` (B, T) tensors.

    Positions restart at 0 for each conversation; the padding tail is one more run of positions, so
    it is its own block in the block-causal mask and never attended to by real tokens.
    """
    width = max(sum(len(c["input_ids"]) for c in row) for row in rows)
    width = -(-width // multiple_of) * multiple_of  # round up: fewer distinct shapes for kernels
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for conv in row:
            n = len(conv["input_ids"])
            input_ids[b, t : t + n] = torch.tensor(conv["input_ids"])
            labels[b, t : t + n] = torch.tensor(conv["labels"])
            position_ids[b, t : t + n] = torch.arange(n)
            t += n
        position_ids[b, t:] = torch.arange(width - t)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


# ---------------------------------------------------------------------------- loaders
class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way through, for exact mid-epoch resume."""

    resume: tuple[int, int] | None = None  # (epoch, samples to skip in that epoch)

    def __iter__(self):
        indices = super().__iter__()
        if self.resume is not None and self.resume[0] == self.epoch:
            indices = itertools.islice(indices, self.resume[1], None)
        self.resume = None
        return iter(indices)


class ResumableLoader(DataLoader):
    """Lightning saves `state_dict()` in checkpoints and calls `load_state_dict()` on resume.

    The state is the epoch and the number of batches the training loop has processed in it (taken from the
    loop, not from this iterator, which Lightning prefetches ahead), so a resumed run sees exactly the batches
    an uninterrupted run would.
    """

    trainer = None

    def state_dict(self) -> dict:
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0
        return {"epoch": self.sampler.epoch, "batches": done}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume = (state["epoch"], state["batches"] * self.batch_size)


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
        seed: int = 0,
    ):
        """
        Args:
            train_file: .json/.jsonl/.parquet file, or a hub dataset name, of `{"messages": [...]}` examples.
            val_file: separate validation data; if None, `val_fraction` of `train_file` is held out.
            val_fraction: share of the training conversations held out for validation when no `val_file`.
            test_file: data for `python -m phi3lit test`.
            predict_file: conversations to answer with `python -m phi3lit predict`; trailing assistant turns are
                dropped and the model writes the next reply.
            split: split to read from a hub dataset.
            val_split: split of `val_file` when it is a hub dataset (default: `split`).
            tokenizer: tokenizer folder or hub id. Linked to `model.pretrained` by the CLI.
            max_length: tokens per packed row; longer conversations are truncated. Linked to the model.
            train_on: `assistant` trains on replies and their `<|end|>`; `all` on every token (model card).
            batch_size: packed rows per micro-batch.
            num_workers: DataLoader worker processes.
            seed: seed of the train/validation split and of the per-epoch row order.
        """
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if max_length < 2:
            raise ValueError(f"data.max_length must be at least 2, got {max_length}")
        self.save_hyperparameters()
        self.tokenizer = None
        self.rows: dict[str, list] = {}
        self.stats: dict[str, dict[str, int]] = {}

    def load_tokenizer(self):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.hparams.tokenizer))
        return self.tokenizer

    def _tokenize(self, conversations: list, name: str) -> list[list[dict]]:
        """Tokenize with HF datasets, drop conversations with nothing to train, pack into rows."""
        import datasets

        tok, hp = self.load_tokenizer(), self.hparams
        ds = datasets.Dataset.from_dict({"messages": conversations})
        ds = ds.map(
            lambda ex: tokenize_chat(ex["messages"], tok, hp.max_length, hp.train_on),
            remove_columns=["messages"],
            desc=f"tokenize {name}",
        )
        ds = ds.filter(lambda ex: any(x != IGNORE_INDEX for x in ex["labels"]), desc=f"filter {name}")
        convs = ds.to_list()
        skipped = len(conversations) - len(convs)
        packed = pack_rows([len(c["input_ids"]) for c in convs], hp.max_length)
        rows = [[convs[i] for i in row] for row in packed]
        real = sum(len(c["input_ids"]) for c in convs)
        self.stats[name] = {"conversations": len(convs), "skipped": skipped, "rows": len(rows), "tokens": real}
        rank_zero_info(
            f"[phi3lit] {name}: {len(convs)} conversations -> {len(rows)} packed rows of <= {hp.max_length} "
            f"tokens ({real / max(1, len(rows) * hp.max_length):.1%} filled); skipped {skipped} with no "
            "assistant token left after truncation"
        )
        return rows

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage in ("fit", "validate") and "train" not in self.rows:
            train = load_conversations(hp.train_file, hp.split)
            if hp.val_file:
                val = load_conversations(hp.val_file, hp.val_split or hp.split)
            else:
                g = torch.Generator().manual_seed(hp.seed)
                perm = torch.randperm(len(train), generator=g).tolist()
                n_val = max(1, round(hp.val_fraction * len(train))) if hp.val_fraction > 0 else 0
                val = [train[i] for i in perm[:n_val]]
                train = [train[i] for i in sorted(perm[n_val:])]
            self.rows["train"] = self._tokenize(train, "train")
            self.rows["val"] = self._tokenize(val, "val") if val else []
        if stage == "test" and "test" not in self.rows:
            if not hp.test_file:
                raise DataError("data.test_file is not set; `test` needs a test file")
            self.rows["test"] = self._tokenize(load_conversations(hp.test_file, hp.split), "test")

        if stage == "predict" and "predict" not in self.rows:
            if not hp.predict_file:
                raise DataError("data.predict_file is not set; `predict` needs prompts")
            self.rows["predict"] = [prompt_of(c) for c in load_conversations(hp.predict_file, hp.split)]

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
            generator=torch.Generator().manual_seed(self.hparams.seed),  # keep the global RNG untouched
        )
        loader.trainer = trainer
        return loader

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False) if self.rows.get("val") else []

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def predict_dataloader(self):
        tok = self.load_tokenizer()

        def collate_prompts(prompts):  # left padding, so every reply starts right after its prompt
            ids = [tokenize_chat(p, tok, add_generation_prompt=True)["input_ids"] for p in prompts]
            width = max(map(len, ids))
            input_ids = torch.full((len(ids), width), tok.unk_token_id or 0, dtype=torch.long)
            attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
            for b, x in enumerate(ids):
                input_ids[b, width - len(x) :] = torch.tensor(x)
                attention_mask[b, width - len(x) :] = 1
            return {"input_ids": input_ids, "attention_mask": attention_mask, "messages": prompts}

        return DataLoader(self.rows["predict"], batch_size=self.hparams.batch_size, collate_fn=collate_prompts)


def prompt_of(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to its last user turn: what the model is asked to answer."""
    end = len(messages)
    while end > 0 and messages[end - 1]["role"] == "assistant":
        end -= 1
    if end == 0:
        raise DataError("a predict prompt has no user turn")
    return list(messages[:end])
