"""End to end: `python -m phi3lit fit --config configs/tiny.yaml`, its outputs, resume, predict and test."""

import json
import math

import pytest
import torch
from helpers import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from phi3lit.__main__ import main
from phi3lit.model.module import Phi3LoRA
from phi3lit.tiny import TINY_DATA

TINY = str(ROOT / "configs" / "tiny.yaml")


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_train_loss_falls_and_val_is_logged(run_dir):
    loss = scalars(run_dir, "train/loss")
    k = max(1, len(loss) // 10)
    # The pretrained base already knows the chat format, so the first loss is low; the facts' answers take it down
    # by far more than 10x.
    assert sum(loss[-k:]) / k < sum(loss[:k]) / k / 10
    # Validation (people the training split never mentions) at steps 100, 200 and 300. Whether it falls there
    # depends on the seed (it rises with seed 1 as the facts are overfitted), so only its values are checked.
    val, ppl = scalars(run_dir, "val/loss"), scalars(run_dir, "val/ppl")
    assert len(val) == 3 and all(0 < v < 5 for v in val)
    assert ppl == pytest.approx([math.exp(v) for v in val], rel=1e-5)
    assert len(scalars(run_dir, "train/lr")) == len(loss)


def test_checkpoint_holds_only_lora_and_training_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert len(keys) == 2 * 2 * 4  # 2 layers x 4 targets x (A, B)
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert ckpt["global_step"] == 300
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["phi3lit"]["lora"]["r"] == 16
    # LoRA weights + two AdamW moments in fp32 (what `plan` predicts), plus a little loop state; no base.
    size = (run_dir / "checkpoints" / "last.ckpt").stat().st_size
    assert 3 * 4 * 114_688 < size < 3 * 4 * 114_688 + 200_000


def test_adapter_loads_in_stock_peft_with_equal_logits(run_dir, tiny_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "tokenizer.json").exists()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), adapter).eval()
    module = Phi3LoRA.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt").eval()
    ids = torch.tensor([[7, 20, 30, 40, 50, 60, 6, 3]])
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_path)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter really changed the model


def test_predict_writes_one_reply_per_prompt(run_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    first = [{"role": "user", "content": "What is 2 + 3?"}]
    second = [{"role": "user", "content": "Count from 1 to 4."}, {"role": "assistant", "content": "x"}]
    prompts.write_text(json.dumps({"messages": first}) + "\n" + json.dumps({"messages": second}) + "\n")
    args = ["predict", "--config", TINY, "--trainer.default_root_dir", str(tmp_path), "--data.predict_file"]
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    main([*args, str(prompts), "--ckpt_path", ckpt, "--model.max_new_tokens", "12"])
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["reply"], str) for r in rows)
    assert rows[1]["messages"] == [{"role": "user", "content": "Count from 1 to 4."}]  # trailing reply dropped
    assert rows[1]["reference"] == "x" and "reference" not in rows[0]  # ... and kept beside the model's reply


def test_test_subcommand_logs_token_weighted_loss(run_dir, tmp_path):
    test_file = tmp_path / "t.jsonl"
    test_file.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[:40]))
    args = ["test", "--config", TINY, "--trainer.default_root_dir", str(tmp_path), "--data.test_file", str(test_file)]
    main([*args, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"test/loss", "test/ppl"} <= set(acc.Tags()["scalars"])


SMALL = ["--trainer.enable_progress_bar", "false", "--data.max_length", "128", "--trainer.val_check_interval", "4"]


def lora_weights(run):
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.parametrize("stop", [6, 8])  # mid-epoch and epoch boundary (8 batches per epoch)
def test_resume_gives_the_uninterrupted_weights(tmp_path, stop):
    data = tmp_path / "small.jsonl"
    data.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[:60]))
    common = ["fit", "--config", TINY, "--data.train_file", str(data), *SMALL, "--checkpoint.every_n_train_steps", "2"]
    main([*common, "--trainer.default_root_dir", str(tmp_path / "a"), "--trainer.max_steps", "12"])
    main([*common, "--trainer.default_root_dir", str(tmp_path / "b"), "--trainer.max_steps", str(stop)])
    resume = ["--trainer.max_steps", "12", "--ckpt_path", "last"]
    main([*common, "--trainer.default_root_dir", str(tmp_path / "b"), *resume])
    a, b = lora_weights(tmp_path / "a"), lora_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_unknown_config_key_fails_with_cli_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", TINY, "--model.bogus", "1"])
    assert e.value.code != 0
    assert "bogus" in capsys.readouterr().err


def test_bad_data_file_fails_before_training_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", TINY, "--data.train_file", str(bad), "--trainer.default_root_dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"phi3lit: data error: {bad}:2: not valid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "checkpoints").exists()


def test_predict_from_adapter_folder_and_merged_model(run_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 + 3?"}]}) + "\n")
    base = ["predict", "--config", TINY, "--data.predict_file", str(prompts), "--model.max_new_tokens", "8"]
    main([*base, "--trainer.default_root_dir", str(tmp_path / "a"), "--model.adapter", str(run_dir / "adapter")])
    main(
        [
            "export",
            "--ckpt",
            str(run_dir / "checkpoints" / "last.ckpt"),
            "--out",
            str(tmp_path / "merged"),
            "--merge",
            "true",
        ]
    )
    main([*base, "--trainer.default_root_dir", str(tmp_path / "m"), "--model.pretrained", str(tmp_path / "merged")])
    main(
        [
            *base,
            "--trainer.default_root_dir",
            str(tmp_path / "c"),
            "--ckpt_path",
            str(run_dir / "checkpoints" / "last.ckpt"),
        ]
    )
    replies = [json.loads((tmp_path / d / "predictions.jsonl").read_text())["reply"] for d in ("a", "m", "c")]
    assert replies[0] == replies[1] == replies[2]  # the same model, loaded three ways, answers the same
