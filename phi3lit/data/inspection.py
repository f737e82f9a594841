"""Inspection: what the data becomes, as `python -m phi3lit data` prints it."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

from phi3lit.data.chat import TRUNCATED
from phi3lit.data.labels import IGNORE_INDEX
from phi3lit.errors import DataError


def _percentile(sorted_values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of an ascending sequence."""
    k = max(0, -(-len(sorted_values) * p // 100) - 1)
    return sorted_values[int(k)]


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


def describe(dm, split: str = "train", example: int | str = 0) -> str:
    """A printable report on one split: counts, lengths, packing, and one example with trained tokens in [[ ]].

    Sets the data module up for the split if needed. Data that leaves no training row raises the `DataError` that
    `fit` raises for it (for the train and val splits, which `fit` reads). `example` indexes the split's examples
    as tokenized (after the validation hold-out and anything skipped while reading), or picks one: `longest`
    (before truncation) or `truncated` (the one that lost the most tokens to max_length).
    """
    stages = {"train": "fit", "val": "fit", "test": "test"}
    if split not in stages:
        raise ValueError(f"split must be one of {', '.join(stages)}, got {split!r}")
    if split not in dm.rows:
        dm.setup(stages[split])
    hp = dm.hparams
    if stages[split] == "fit" and not dm.rows["train"]:  # `fit` refuses this data: say so, exit 2, as it would
        held_out = 0 if hp.val_file else dm.stats.get("val", {}).get("examples", 0)
        raise DataError(dm._nothing_to_train(dm.stats["train"], held_out))
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
