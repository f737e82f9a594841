"""Scale and precision on the CPU: real 2-process DDP (gloo) and every precision switch."""

import subprocess
import sys

import lightning as L
import pytest
import torch
from helpers import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from phi3lit.__main__ import main
from phi3lit.data import ChatDataModule
from phi3lit.model.lora import LoraSpec
from phi3lit.model.module import Phi3LoRA
from phi3lit.tiny import TINY_DATA


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "d.jsonl"
    path.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[:80]))
    return path


def fit(data, root, *extra):
    args = [
        "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--data.train_file", str(data), "--data.max_length", "128", "--data.batch_size", "2",
        "--model.lora.dropout", "0", "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", "2", "--samples.prompts", "[]", "--trainer.default_root_dir", str(root),
        *extra,
    ]  # fmt: skip
    if "--trainer.devices" in extra:  # Lightning starts rank 1 by re-running the command line: it must be one
        proc = subprocess.run([sys.executable, "-m", "phi3lit", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        main(args)
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)


def test_ddp_two_processes_equal_one_process_with_accumulation(data, tmp_path):
    ddp = fit(data, tmp_path / "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    one = fit(data, tmp_path / "one", "--trainer.accumulate_grad_batches", "2")
    assert ddp["global_step"] == one["global_step"] == 4
    a, b = ddp["state_dict"], one["state_dict"]
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    # Only rank 0 writes: one TensorBoard event file, one adapter.
    assert len(list((tmp_path / "ddp" / "tb").glob("events.out.tfevents.*"))) == 1
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").exists()
    acc = EventAccumulator(str(tmp_path / "ddp" / "tb"))
    acc.Reload()
    assert "val/loss" in acc.Tags()["scalars"]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "16-mixed"])
@pytest.mark.parametrize("lora_fp32", [True, False])
def test_precision_switches_train_on_cpu(tiny_path, data, precision, lora_fp32):
    if lora_fp32 is False and precision != "bf16-true":
        pytest.skip("lora_fp32 only matters under bf16-true")
    L.seed_everything(0)
    module = Phi3LoRA(pretrained=tiny_path, lora=LoraSpec(dropout=0.0), lora_fp32=lora_fp32)
    dm = ChatDataModule(str(data), val_fraction=0.0, tokenizer=tiny_path, max_length=128, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu", precision=precision, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    lora = [p for p in module.parameters() if p.requires_grad]
    frozen = [p for p in module.model.parameters() if not p.requires_grad]
    half_base = precision == "bf16-true"
    assert all(p.dtype == (torch.bfloat16 if half_base else torch.float32) for p in frozen)
    expected = torch.float32 if (lora_fp32 or not half_base) else torch.bfloat16
    assert all(p.dtype == expected for p in lora)
    state = trainer.optimizers[0].state
    assert state and all(s["exp_avg"].dtype == expected for s in state.values())
