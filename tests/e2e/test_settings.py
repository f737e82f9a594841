"""Settings that were accepted but silently had no effect or the wrong one, each driven through the CLI."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from helpers import ROOT
from probes import probe_arg
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from phi3lit.__main__ import main

TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--samples.prompts", "[]", "--data.max_length", "128"]


def fit(data, root, *extra):
    args = ["fit", "--config", TINY, "--data.train_file", str(data), *QUIET, "--trainer.default_root_dir", str(root)]
    main([*args, *extra])


def qkv_b(adapter_dir) -> list[torch.Tensor]:
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    return [v for k, v in sorted(weights.items()) if "qkv_proj.lora_B" in k]


def test_continuing_from_a_slice_adapter_keeps_the_off_slices_zero(small_data, tmp_path, caplog):
    """`model.adapter` with `[q, v]`: the k rows of qkv_proj stay exactly zero, and the count is the fresh one."""
    qv = ["--model.lora.targets", "[q, v]", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"]
    fit(small_data, tmp_path / "first", *qv)
    fit(small_data, tmp_path / "second", *qv, "--model.adapter", str(tmp_path / "first" / "adapter"))
    counts = [line for line in caplog.messages if "trainable params:" in line]
    assert len(counts) == 2 and counts[0].split("||")[0] == counts[1].split("||")[0]  # not doubled
    h, r = 256, 16  # tiny hidden size; q, k, v are 256 rows each
    first, second = qkv_b(tmp_path / "first" / "adapter"), qkv_b(tmp_path / "second" / "adapter")
    for b1, b2 in zip(first, second, strict=True):
        assert b2.shape == (3 * h, 2 * r)
        assert torch.count_nonzero(b2[h : 2 * h]) == 0  # k: never adapted
        assert torch.count_nonzero(b2[:h, r:]) == 0 and torch.count_nonzero(b2[2 * h :, :r]) == 0  # q uses A_q only
        assert not torch.equal(b1, b2)  # it did train on


def test_continuing_from_an_adapter_with_other_lora_settings_is_refused(small_data, tmp_path, capsys):
    fit(small_data, tmp_path / "first", "--model.lora.targets", "[q, v]", "--trainer.max_steps", "1")
    adapter = str(tmp_path / "first" / "adapter")
    with pytest.raises(SystemExit) as e:
        fit(small_data, tmp_path / "second", "--model.adapter", adapter, "--trainer.max_steps", "1")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "phi3lit: config error: model.adapter=" in err and "model.lora.targets" in err
    assert not (tmp_path / "second" / "adapter").exists()


def test_validation_time_is_not_counted_as_training_time(small_data, tmp_path):
    """A slow validation (2 s a batch) between two logged windows must not lower train/tokens_per_sec."""
    extra = ["--trainer.max_steps", "8", "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "4"]
    extra += ["--trainer.limit_val_batches", "1", *probe_arg("SlowValidation", tmp_path / "unused", seconds=2.0)]
    fit(small_data, tmp_path / "run", *extra)
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    speed = {e.step: e.value for e in acc.Scalars("train/tokens_per_sec")}
    after_validation = speed[5]  # logged at step 5, whose window holds the validation after step 4
    others = statistics.median(v for s, v in speed.items() if s not in (1, 5))
    assert after_validation > 0.4 * others, speed  # 2 s of validation would cut it to a fraction


BAD_INPUTS = {
    "data": ["data", "--config", TINY, "--data.train_file", "/nonexistent/train.jsonl"],
    "plan": ["plan", "--config", TINY, "--model.pretrained", "/nonexistent/model"],
    "export": ["export", "--ckpt", "/nonexistent/last.ckpt", "--out", "/tmp/phi3lit-never-written"],
    "chat": ["chat", "--adapter", "/nonexistent/adapter"],
    "ablate": ["ablate", "/nonexistent/sweep.yaml"],
}


@pytest.mark.parametrize("command", sorted(BAD_INPUTS))
def test_every_subcommand_reports_bad_input_in_one_line(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(BAD_INPUTS[command])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("phi3lit: ") and " error: " in err and "/nonexistent/" in err
    assert "Traceback" not in err


def test_export_and_predict_name_a_damaged_adapter_or_checkpoint(small_data, tmp_path, capsys):
    fit(small_data, tmp_path / "run", "--trainer.max_steps", "1")
    run = tmp_path / "run"
    (tmp_path / "file").write_text("not a folder")
    cases = [
        (["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "file")], "is a file"),
    ]
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for name in ("adapter_config.json", "tokenizer.json", "tokenizer_config.json"):
        (truncated / name).write_bytes((run / "adapter" / name).read_bytes())
    data = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes(data)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    predict = ["predict", "--config", TINY, "--data.predict_file", str(prompts), "--trainer.default_root_dir"]
    cases += [
        (["chat", "--adapter", str(truncated)], "cannot load the adapter"),
        (["chat", "--adapter", str(no_config)], "no adapter_config.json"),
        ([*predict, str(tmp_path / "p1"), "--model.adapter", str(truncated)], "cannot load it"),
        ([*predict, str(tmp_path / "p2"), "--model.adapter", str(no_config)], "no adapter_config.json"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, (args, err)
