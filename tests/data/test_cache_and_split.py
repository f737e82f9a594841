"""What the data pipeline refuses to get wrong: the tokenization cache, empty training data, validation subsets,
hostile files. Everything is driven through the CLI, as a user runs it."""

import json
import re
import shutil

import pytest
from helpers import ROOT

from phi3lit.__main__ import main
from phi3lit.tiny import TINY_DATA

TINY = str(ROOT / "configs" / "tiny.yaml")


def data_report(capsys, cache, *extra) -> str:
    """`python -m phi3lit data ...`: the printed report of the training split."""
    main(["data", "--config", TINY, "--data.cache_dir", str(cache), "--data.max_length", "128", *extra])
    return capsys.readouterr().out


# ---------------------------------------------------------------------------- cache key
@pytest.mark.parametrize("token", ["bos_token", "eos_token"])
def test_cache_key_follows_the_special_tokens_the_template_renders(tmp_path, tiny_path, capsys, token):
    cache = tmp_path / "cache"
    first = data_report(capsys, cache)
    assert "tokenized      2,000 conversations now" in first
    same = tmp_path / "same"  # the same files in another folder: their location is not part of the key
    shutil.copytree(tiny_path, same)
    assert "read from the cache" in data_report(capsys, cache, "--model.pretrained", str(same))

    changed = tmp_path / "changed"
    shutil.copytree(tiny_path, changed)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    config[token] = "</s>" if token == "eos_token" else "<|endoftext|>"  # another token the vocabulary has
    (changed / "tokenizer_config.json").write_text(json.dumps(config))
    again = data_report(capsys, cache, "--model.pretrained", str(changed))
    assert "tokenized      2,000 conversations now" in again and "read from the cache" not in again


# ---------------------------------------------------------------------------- nothing to train
def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def test_a_run_with_nothing_to_train_fails_with_the_counts(tmp_path, capsys):
    long_reply = " ".join(["word"] * 200)  # far over max_length 64
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(10)]  # no reply: nothing to train
    long = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": long_reply}] for _ in range(10)]
    data = write_jsonl(tmp_path / "d.jsonl", prompts + long)
    root = tmp_path / "run"
    args = ["fit", "--config", TINY, "--data.train_file", str(data), "--data.val_file", "null"]
    args += ["--trainer.default_root_dir", str(root)]
    settings = ["--data.max_length", "64", "--data.truncation", "drop", "--data.cache_dir", str(tmp_path / "c")]
    with pytest.raises(SystemExit) as e:
        main([*args, *settings])
    assert e.value.code == 2
    err = capsys.readouterr().err
    # 20 examples: 1 held out (5%), and of the other 19 every one is left out one way or another.
    assert f"phi3lit: data error: {data}: nothing to train on: 20 examples, 1 held out for validation" in err
    m = re.search(
        r"held out for validation, (\d+) skipped \(no_reply (\d+)\), (\d+) dropped \(over data.max_length=64", err
    )
    assert m and int(m[1]) == int(m[2]) and int(m[1]) + int(m[3]) == 19 and int(m[3]) >= 9, err
    assert "-> 0 packed training rows" in err
    assert "Traceback" not in err
    assert not (root / "adapter").exists()


# ---------------------------------------------------------------------------- limited validation
def test_limited_validation_scores_a_fixed_random_subset_not_the_longest(tmp_path, tiny_tokenizer, caplog):
    from probes import probe_arg, read_probe

    from phi3lit.data import tokenize_chat

    lines = TINY_DATA.read_text().splitlines(keepends=True)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(lines[:40]))
    val.write_text("".join(lines[100:160]))
    rows = tmp_path / "rows.jsonl"
    main(
        [
            "fit", "--config", TINY, "--data.train_file", str(train), "--data.val_file", str(val),
            "--data.max_length", "512", "--data.batch_size", "2", "--data.cache_dir", str(tmp_path / "c"),
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]",
            "--trainer.default_root_dir", str(tmp_path / "run"), *probe_arg("RecordRows", rows),
        ]
    )  # fmt: skip
    scored = {}
    for r in read_probe(rows):
        if r["stage"] == "val":
            scored.setdefault(r["step"], []).extend(r["sources"])
    assert sorted(scored) == [2, 4]
    first, second = scored[2], scored[4]
    assert first == second  # the same subset, in the same order, at every validation
    length = {
        f"{val}:{n}": len(tokenize_chat(json.loads(line)["messages"], tiny_tokenizer)["input_ids"])
        for n, line in enumerate(lines[100:160], 1)
    }
    by_length = sorted(length, key=length.get, reverse=True)
    assert set(first) <= set(length) and 2 <= len(first) < len(length)
    assert max(length.values()) <= 512  # nothing truncated: these are the lengths that were packed
    # Packed longest-first and read in order, the first batch held the longest conversations; now it does not.
    assert by_length[0] not in first
    assert set(first) != set(by_length[: len(first)])
    assert "[phi3lit] val: limit_val_batches=1 scores 2 of " in caplog.text
    assert f": {len(first)} of 60 conversations" in caplog.text


# ---------------------------------------------------------------------------- damaged cache
def message_ends(path) -> list[int]:
    """Byte offsets where each IPC message of an Arrow stream file ends (schema, then record batches)."""
    import pyarrow as pa

    ends = []
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.MessageReader.open_stream(source)
        while True:
            try:
                reader.read_next_message()
            except StopIteration:
                return ends
            ends.append(source.tell())


@pytest.mark.parametrize("cut", ["batch boundary", "mid-batch"])
def test_a_damaged_cache_is_rebuilt_never_read(tmp_path, capsys, caplog, cut):
    cache = tmp_path / "cache"
    assert "tokenized      2,000 conversations now" in data_report(capsys, cache)
    assert not list(cache.glob("phi3lit-tmp-*"))
    train = max(cache.glob("*.arrow"), key=lambda p: p.stat().st_size)  # the 2,000 training conversations
    ends = message_ends(train)
    assert len(ends) >= 3  # the schema and at least two record batches of 1,000 rows
    size = ends[1] if cut == "batch boundary" else (ends[1] + ends[2]) // 2
    with open(train, "r+b") as f:
        f.truncate(size)
    caplog.clear()
    report = data_report(capsys, cache)
    assert f"[phi3lit] cache: {train} is damaged" in caplog.text
    assert "examples       2,000" in report and "tokenized      2,000 conversations now" in report
    assert train.stat().st_size > size and len(message_ends(train)) == len(ends)
    assert "read from the cache" in data_report(capsys, cache)  # the rebuilt file is good


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(tmp_path, capsys):
    import os
    import socket
    import time

    cache = tmp_path / "cache"
    cache.mkdir()
    host = socket.gethostname()
    old = cache / "phi3lit-tmp-otherhost-1-x.arrow"  # another machine's, an hour untouched: its writer is gone
    of_dead = cache / f"phi3lit-tmp-{host}-999999999-x.arrow"  # ours, of a pid above Linux's pid_max
    fresh = cache / "phi3lit-tmp-otherhost-2-y.arrow"  # just written: may be a concurrent run's file in the making
    for f in (old, of_dead, fresh):
        f.write_bytes(b"partial")
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # an hour untouched: its writer is gone
    data_report(capsys, cache)
    assert not old.exists() and not of_dead.exists()
    assert fresh.exists()  # may be a concurrent run's file in the making


# ---------------------------------------------------------------------------- hostile files
REPLY = {"role": "assistant", "content": "Fine."}


def fit_error(tmp_path, capsys, data) -> str:
    """Run `fit` on `data`; it must stop before training with a one-line data error and exit code 2."""
    root = tmp_path / "run"
    args = ["fit", "--config", TINY, "--data.train_file", str(data), "--data.val_file", "null"]
    args += ["--trainer.default_root_dir", str(root)]
    with pytest.raises(SystemExit) as e:
        main([*args, "--data.cache_dir", str(tmp_path / "cache")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (root / "checkpoints").exists()
    return err


def test_a_lone_surrogate_is_a_data_error_naming_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, REPLY]})
    # The JSON escape of half a UTF-16 pair: json.loads accepts it, UTF-8 cannot encode it.
    bad = '{"messages": [{"role": "user", "content": "Hi \\ud800 there"}, {"role": "assistant", "content": "x"}]}'
    data.write_text("\n".join([good] * 5 + [bad]) + "\n")
    err = fit_error(tmp_path, capsys, data)
    assert f"phi3lit: data error: {data}:6: message 0 has a lone surrogate '\\ud800' at character 3" in err


def test_a_jsonl_file_holding_a_json_array_says_rename_it(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hi"}, REPLY]}] * 5, indent=2))
    err = fit_error(tmp_path, capsys, data)
    assert f"phi3lit: data error: {data}: holds a JSON array, not JSON Lines" in err
    assert "rename it to d.json" in err


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, capsys, suffix):
    lines = TINY_DATA.read_text().splitlines()[:40]
    text = "\n".join(lines) + "\n" if suffix == ".jsonl" else "[\n" + ",\n".join(lines) + "\n]\n"
    data = tmp_path / f"d{suffix}"
    data.write_bytes(b"\xef\xbb\xbf" + text.encode())  # what Notepad and PowerShell write
    report = data_report(capsys, tmp_path / "cache", "--data.train_file", str(data), "--data.val_fraction", "0")
    assert "examples       40" in report
