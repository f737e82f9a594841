"""Packing efficiency and order, DDP shards, the tokenization cache, and the `describe` report."""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import SHARED_DATA, needs_real_tokenizer, needs_shared_data

from phi3lit.data import ChatDataModule, ResumableSampler, describe, render_trained, tokenize_chat
from phi3lit.tiny import TINY_DATA


def tiny_dm(tmp_path, **kwargs):
    kwargs = {"max_length": 128, "batch_size": 2, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return ChatDataModule(str(TINY_DATA), **kwargs)


def lengths_of(rows):
    return [[len(c["input_ids"]) for c in row] for row in rows]


# ---------------------------------------------------------------------------- packing
@needs_real_tokenizer
@needs_shared_data
def test_packing_fills_95_percent_of_slots_on_oasst(tmp_path, real_tokenizer):
    dm = ChatDataModule(
        str(SHARED_DATA / "oasst_en_100_all_paths.jsonl"),
        val_fraction=0.0,
        tokenizer=real_tokenizer.name_or_path,
        max_length=2048,
        cache_dir=str(tmp_path),
    )
    dm.setup("fit")
    s = dm.stats["train"]
    assert s["slots"] == s["rows"] * 2048
    assert s["real_tokens"] == sum(len(c["input_ids"]) for row in dm.rows["train"] for c in row)
    assert s["real_tokens"] / s["slots"] >= 0.95
    assert 0 < s["trained_tokens"] < s["real_tokens"]
    assert s["examples"] == 564 and s["conversations"] == 564 and s["truncated"] == 3


def test_stats_are_a_flat_dict_of_ints_per_split(tmp_path, tiny_path):
    dm = tiny_dm(tmp_path, tokenizer=tiny_path)
    dm.setup("fit")
    assert set(dm.stats) == {"train", "val"}
    for s in dm.stats.values():
        assert all(isinstance(v, int) for v in s.values())
        assert s["examples"] == s["conversations"] + s["skipped"] + s["dropped"]
        assert s["real_tokens"] <= s["slots"]
    assert dm.stats["train"]["examples"] + dm.stats["val"]["examples"] == 1200


def test_packing_is_deterministic_and_rows_are_reshuffled_each_epoch(tmp_path, tiny_path):
    a, b = tiny_dm(tmp_path, tokenizer=tiny_path), tiny_dm(tmp_path / "other", tokenizer=tiny_path)
    a.setup("fit")
    b.setup("fit")
    assert lengths_of(a.rows["train"]) == lengths_of(b.rows["train"])
    assert [a.rows["train"][i] for i in (0, 7, 42)] == [b.rows["train"][i] for i in (0, 7, 42)]
    sampler = a.train_dataloader().sampler
    first = list(sampler)
    assert list(b.train_dataloader().sampler) == first  # same seed, same order
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == sorted(first)


@pytest.mark.parametrize("n_rows", [10, 11])
def test_ddp_ranks_read_disjoint_shards_that_cover_every_row(n_rows):
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            sampler = ResumableSampler(range(n_rows), num_replicas=2, rank=rank, shuffle=True, seed=3)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert len(shards[0]) == len(shards[1])  # equal steps per rank, or DDP would hang
        assert set(shards[0]) | set(shards[1]) == set(range(n_rows))
        # DistributedSampler evens out an odd count by repeating rows from the start of the order: with 11 rows,
        # exactly one row is read twice per epoch (on both ranks); everything else is read exactly once.
        assert len(set(shards[0]) & set(shards[1])) == n_rows % 2
        assert len(shards[0]) + len(shards[1]) == n_rows + n_rows % 2


def test_datamodule_shards_by_trainer_rank(tmp_path, tiny_path):
    dm = tiny_dm(tmp_path, tokenizer=tiny_path)
    dm.setup("fit")
    shards = []
    for rank in (0, 1):
        cpu = SimpleNamespace(root_device=torch.device("cpu"))
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=cpu)
        shards.append(set(dm.train_dataloader().sampler))
    n = len(dm.rows["train"])
    assert shards[0] | shards[1] == set(range(n)) and len(shards[0] & shards[1]) == n % 2


# ---------------------------------------------------------------------------- tokenize once
def test_second_setup_reads_the_cache_instead_of_tokenizing(tmp_path, tiny_path):
    first = tiny_dm(tmp_path, tokenizer=tiny_path)
    first.setup("fit")
    assert first.stats["train"]["tokenized"] == 1140 and first.stats["val"]["tokenized"] == 60

    again = tiny_dm(tmp_path, tokenizer=tiny_path)
    again.setup("fit")
    assert again.stats["train"]["tokenized"] == 0 and again.stats["val"]["tokenized"] == 0
    assert {k: v for k, v in again.stats["train"].items() if k != "tokenized"} == {
        k: v for k, v in first.stats["train"].items() if k != "tokenized"
    }
    assert [again.rows["train"][i] for i in range(0, 140, 7)] == [first.rows["train"][i] for i in range(0, 140, 7)]

    # Anything that changes the ids tokenizes again: a setting, the data.
    other = tiny_dm(tmp_path, tokenizer=tiny_path, max_length=96)
    other.setup("fit")
    assert other.stats["train"]["tokenized"] == 1140
    lines = TINY_DATA.read_text().splitlines(keepends=True)
    (tmp_path / "d.jsonl").write_text("".join(lines[:50]))
    changed = ChatDataModule(str(tmp_path / "d.jsonl"), val_fraction=0.0, tokenizer=tiny_path,
                             cache_dir=str(tmp_path / "cache"))  # fmt: skip
    changed.setup("fit")
    assert changed.stats["train"]["tokenized"] == 50


def test_cache_key_depends_on_the_tokenizer(tmp_path, tiny_path, tiny_tokenizer):
    from phi3lit.data import cache_key

    conv = json.loads(TINY_DATA.read_text().splitlines()[0])["messages"]
    key = cache_key([conv], tiny_tokenizer, max_length=128)
    assert cache_key([conv], tiny_tokenizer, max_length=128) == key
    assert cache_key([conv], tiny_tokenizer, max_length=64) != key
    assert cache_key([conv[:-1]], tiny_tokenizer, max_length=128) != key
    from transformers import AutoTokenizer

    altered = AutoTokenizer.from_pretrained(tiny_path)
    altered.chat_template = altered.chat_template.replace("<|end|>", "<|end|> ")
    assert cache_key([conv], altered, max_length=128) != key


# ---------------------------------------------------------------------------- describe
def test_describe_reports_counts_lengths_packing_and_marks_trained_tokens(tmp_path, tiny_path):
    dm = tiny_dm(tmp_path, tokenizer=tiny_path, max_length=96)
    report = describe(dm, "train", example=3)
    s = dm.stats["train"]
    lines = report.splitlines()
    assert lines[0] == f"phi3lit data: train split of {TINY_DATA}"
    assert f"  examples       {s['examples']:,}" in lines
    assert any(line.startswith("  length         p50 ") and ", max " in line for line in lines)
    efficiency = f"{s['real_tokens'] / s['slots']:.1%} real, {s['trained_tokens'] / s['slots']:.1%} trained"
    assert any(line.startswith(f"  packing        {s['rows']:,} rows x 96 = ") and efficiency in line for line in lines)
    assert "  skipped        0 (unknown_role 0, empty_reply 0, not_alternating 0, no_reply 0, too_long 0)" in lines
    # Example 3 of the tiny data (no conversation is held out before it with this seed): one exchange.
    assert report.endswith("<|assistant|>\n[[TREE RIVER RED DOOR!<|end|>]]\n<|endoftext|>")
    assert "example 3: kept, 29 tokens, 6 trained; trained tokens are inside [[ ]]:" in lines


def test_describe_a_skipped_example_and_a_missing_split(tmp_path, tiny_path):
    conv = [{"role": "user", "content": "no reply"}]
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": conv}) + "\n" + TINY_DATA.read_text())
    dm = ChatDataModule(str(tmp_path / "d.jsonl"), val_fraction=0.0, tokenizer=tiny_path, cache_dir=str(tmp_path))
    assert describe(dm, example=0).endswith(
        "example 0: no_reply, 0 tokens, 0 trained (left out of training, so nothing to show)"
    )
    assert describe(dm, "val").endswith("  no examples")
    with pytest.raises(ValueError, match="split must be one of train, val, test, got 'dev'"):
        describe(dm, "dev")


@needs_real_tokenizer
def test_render_trained_keeps_spaces_that_sentencepiece_drops_alone(real_tokenizer):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " two  spaces"}]
    out = tokenize_chat(conv, real_tokenizer)
    text = render_trained(out["input_ids"], out["labels"], real_tokenizer)
    assert text == "<|user|> \nHi<|end|> \n<|assistant|> \n[[ two  spaces<|end|>]] \n<|endoftext|>"
