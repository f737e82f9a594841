"""Packing: conversations -> rows of at most `max_length` tokens, and rows -> model inputs.

`pack_rows` places conversations into rows, best-fit decreasing. Validation and test conversations are placed in a
seeded random order instead (plain best fit), so that the first rows, all that a `limit_val_batches` scores, are a
fair sample and not the longest conversations; that order is fixed for the run, so every validation scores the same
subset.

`collate` turns rows into `input_ids`, `labels` and `position_ids` that restart at 0 for every conversation. There is
no `attention_mask`: given `position_ids`, no mask and no KV cache, transformers builds the block-causal mask itself,
so packed conversations never see each other. Padding uses the `<unk>` id (0) and is masked by position (label -100,
its own position run), never by token id. `left_pad` is the other padding: prompts for generation, padded on the left
so every reply starts right after its prompt.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import torch

from phi3lit.data.labels import IGNORE_INDEX, loss_index


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


def collate(rows: Sequence[Sequence[dict[str, list[int]]]], pad_id: int = 0, multiple_of: int = 8) -> dict:
    """Rows of packed conversations -> `input_ids`, `labels`, `position_ids` (B, T) tensors.

    Positions restart at 0 for each conversation; the padding tail is one more run of positions, so
    it is its own block in the block-causal mask and never attended to by real tokens. `cu_seq_lens` holds
    the same blocks as cumulative offsets over the flattened rows (int32, what varlen attention kernels take),
    `doc_offsets` the same as a list (for `phi3lit.model.attention`; a list stays on the host when Lightning moves
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


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every reply starts right after its prompt: (input_ids, attention_mask)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :] = torch.tensor(s)
        mask[b, width - len(s) :] = 1
    return ids, mask
