"""Packing, collation, the DataModule, and bad input files."""

import json
import random

import pytest
import torch

from phi3lit.data import IGNORE_INDEX, ChatDataModule, DataError, collate, load_conversations, pack_rows
from phi3lit.tiny import TINY_DATA


def test_pack_rows_best_fit_decreasing():
    lengths = [7, 3, 5, 2, 8, 1, 4]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # each sequence exactly once
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert rows == [[4, 3], [0, 1], [2, 6, 5]]  # 8+2, 7+3, 5+4+1: BFD fills every row exactly
    assert pack_rows(lengths, 10) == rows  # deterministic


def test_pack_rows_random_never_overflows_and_is_near_optimal():
    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(2000)]
    rows = pack_rows(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(2000))
    assert max(sum(lengths[i] for i in r) for r in rows) <= 512
    lower_bound = -(-sum(lengths) // 512)
    assert len(rows) <= lower_bound * 1.03


def test_pack_rows_rejects_overlong():
    with pytest.raises(ValueError, match="max_length"):
        pack_rows([5, 11], 10)


def test_collate_positions_restart_and_padding_is_masked_by_position():
    a = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]}
    c = {"input_ids": [4], "labels": [IGNORE_INDEX]}
    batch = collate([[a, b], [c]], pad_id=0, multiple_of=8)
    tensors = {"input_ids", "labels", "position_ids", "cu_seq_lens", "loss_index"}
    assert {k for k, v in batch.items() if torch.is_tensor(v)} == tensors
    assert batch["real_tokens"] == 6
    # The same blocks as offsets over the flattened rows: [a, b, pad | c, pad].
    assert batch["cu_seq_lens"].tolist() == batch["doc_offsets"] == [0, 3, 5, 8, 9, 16] and batch["max_seq_len"] == 7
    # Positions 0, 1 and 3 of the first row predict trained tokens (6, 7, 9); none in the second row.
    assert batch["loss_index"].tolist() == [0, 1, 3]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert batch["labels"].tolist()[0] == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9] + [IGNORE_INDEX] * 3


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_datamodule_packs_and_counts_skipped(tmp_path, tiny_path):
    long_user = {"role": "user", "content": "word " * 400}  # its reply is cut off by max_length
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}."}]}
        for i in range(30)
    ]
    rows.append({"messages": [long_user, {"role": "assistant", "content": "ok"}]})
    rows.append({"messages": [{"role": "user", "content": "no reply"}]})
    dm = ChatDataModule(write_jsonl(tmp_path / "d.jsonl", rows), val_fraction=0.0, tokenizer=tiny_path, max_length=64)
    dm.setup("fit")
    assert dm.stats["train"]["skipped"] == 2 and dm.stats["train"]["conversations"] == 30
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 64
    starts = (batch["position_ids"] == 0).sum(1)
    assert (starts >= 2).all()  # several conversations share a row


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"messages": []}\nnot json\n', r"d\.jsonl:2: not valid JSON"),
        ('{"messages": [{"role": "user", "content": "a"}]}\n{"text": "x"}\n', r"d\.jsonl:2: example has no 'messages'"),
        ('{"messages": [{"role": "user"}]}\n', r"d\.jsonl:1: message 0 needs both 'role' and 'content'"),
        ('{"messages": [{"role": "bot", "content": "a"}]}\n', r"d\.jsonl:1: message 0 has role 'bot'"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        load_conversations(str(tmp_path / "d.jsonl"))


def test_bad_json_names_line(tmp_path):
    (tmp_path / "d.json").write_text('[\n {"messages": []},\n {oops}\n]')
    with pytest.raises(DataError, match=r"d\.json:3: not valid JSON"):
        load_conversations(str(tmp_path / "d.json"))


def test_parquet_source(tmp_path):
    import datasets

    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    datasets.Dataset.from_dict({"messages": [conv, conv]}).to_parquet(str(tmp_path / "d.parquet"))
    assert load_conversations(str(tmp_path / "d.parquet")) == [conv, conv]


def test_train_order_depends_only_on_seed_and_epoch(tmp_path, tiny_path):
    dm = ChatDataModule(str(TINY_DATA), tokenizer=tiny_path, max_length=128, batch_size=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = [b["input_ids"] for b in loader][:3]
    again = [b["input_ids"] for b in loader][:3]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    loader.sampler.set_epoch(1)
    other = [b["input_ids"] for b in loader][:3]
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(first, other, strict=True))


@pytest.mark.parametrize("setting, pinned", [(None, False), (True, True), (False, False)])
def test_pin_memory_is_on_only_when_asked_or_training_on_cuda(tiny_path, tmp_path, setting, pinned):
    import lightning as L

    dm = ChatDataModule(str(TINY_DATA), tokenizer=tiny_path, max_length=128, pin_memory=setting,
                        cache_dir=str(tmp_path))  # fmt: skip
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)  # auto: off on CPU
    dm.setup("fit")
    assert dm.train_dataloader().pin_memory is pinned
