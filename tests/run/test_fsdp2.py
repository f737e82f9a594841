"""FSDP2 (configs/strategy/fsdp2.yaml: `fully_shard` through Lightning's ModelParallelStrategy) on 2 CPU processes.

Every run goes through the CLI in a subprocess (Lightning starts rank 1 by re-running the command line), with the
overlay as a user adds it. A probe (`ShardProbe`, loaded from this file by class path) asserts on every rank that
the LoRA weights really are sharded DTensors, so the equalities below fail if sharding is silently off.
"""

import json
import os
import shutil
import subprocess
import sys

import lightning as L
import pytest
import torch
from helpers import ROOT, TINY, explain
from probes import probe_arg, read_probe

FSDP2 = str(ROOT / "configs" / "strategy" / "fsdp2.yaml")
STEPS, STOP, BATCH = 6, 3, 2


class ShardProbe(L.Callback):
    """Per rank, at the first training step: whether every trainable parameter is a DTensor sharded over 2 ranks."""

    def __init__(self, out: str):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if getattr(self, "done", False):
            return
        from torch.distributed.tensor import DTensor

        self.done = True
        lora = [p for p in pl_module.parameters() if p.requires_grad]
        frozen = [p for p in pl_module.model.get_base_model().model.layers.parameters() if not p.requires_grad]
        record = {
            "rank": trainer.global_rank,
            "lora": len(lora),
            "lora_dtensor": sum(isinstance(p, DTensor) and p.device_mesh.size() == 2 for p in lora),
            "frozen_layers_dtensor": all(isinstance(p, DTensor) for p in frozen),
            "local_fraction": sum(p.to_local().numel() for p in lora) / sum(p.numel() for p in lora),
        }
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\n")


def fit(data, root, *extra, processes=2, batch=BATCH):
    """`phi3lit fit` on the tiny model: FSDP2 over `processes` CPU processes, or one plain process (processes=1)."""
    strategy = ["--config", FSDP2, "--trainer.devices", "2"] if processes == 2 else []
    args = [
        "fit", "--config", TINY, *strategy, "--trainer.accelerator", "cpu",
        "--data.train_file", str(data), "--data.max_length", "128", "--data.batch_size", str(batch),
        "--model.lora.dropout", "0", "--trainer.max_steps", str(STEPS), "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", "3", "--checkpoint.every_n_train_steps", "50", "--samples.prompts", "[]",
        "--lr_scheduler.init_args.warmup_steps", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.gradient_clip_val", "0.5", "--trainer.default_root_dir", str(root), *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "tests" / "run")])}
    proc = subprocess.run([sys.executable, "-m", "phi3lit", *args], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def shard_probe(out):
    return [
        f"--trainer.callbacks+={json.dumps({'class_path': 'test_fsdp2.ShardProbe', 'init_args': {'out': str(out)}})}"
    ]


def lora_tensors(root):
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def scalars(root, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "tb"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 60 chats of the lab's world (conftest's are skill chats, which the pretrained base already knows):
    their gradients are far from zero, where Adam would turn float-order differences between 2 processes and 1 into
    visible ones."""
    from phi3lit.tiny import WORLD_DIR

    path = tmp_path_factory.mktemp("data") / "world.jsonl"
    path.write_text("".join((WORLD_DIR / "train.jsonl").read_text().splitlines(keepends=True)[:60]))
    return path


@pytest.fixture(scope="module")
def fsdp2_run(small_data, tmp_path_factory):
    """The uninterrupted 2-process FSDP2 run every test here compares with."""
    root = tmp_path_factory.mktemp("fsdp2")
    fit(small_data, root, *shard_probe(root / "shards.jsonl"))
    return root


@pytest.fixture(scope="module")
def stopped_run(small_data, tmp_path_factory):
    """A 2-process FSDP2 run stopped by SIGTERM (on both ranks) at step STOP: last.ckpt holds step STOP."""
    root = tmp_path_factory.mktemp("stopped")
    fit(small_data, root, *probe_arg("SignalAt", root / "signal.jsonl", step=STOP))
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STOP
    assert not (root / "adapter").exists()  # unfinished: no adapter
    return root


def test_fsdp2_shards_lora_on_every_rank_and_equals_one_process_at_double_batch(fsdp2_run, small_data, tmp_path):
    shards = read_probe(fsdp2_run / "shards.jsonl")
    assert sorted(r["rank"] for r in shards) == [0, 1]
    for r in shards:
        assert r["lora"] > 0 and r["lora_dtensor"] == r["lora"], r  # every LoRA weight is a DTensor over 2 ranks
        assert r["frozen_layers_dtensor"], r  # the frozen base weights are sharded too
        assert r["local_fraction"] == pytest.approx(0.5, abs=0.05), r  # each rank holds about half
    one = tmp_path / "one"
    fit(small_data, one, processes=1, batch=2 * BATCH)
    sharded = torch.load(fsdp2_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert sharded["global_step"] == STEPS
    assert all(type(v) is torch.Tensor for v in sharded["state_dict"].values())  # gathered, full tensors
    assert max_diff(sharded["state_dict"], lora_tensors(one)) <= 1e-5
    # The logged gradient norm (the one clipping used) is the global norm over both ranks' shards, not a local one.
    sharded_norms, one_norms = scalars(fsdp2_run, "train/grad_norm"), scalars(one, "train/grad_norm")
    assert len(sharded_norms) == len(one_norms) > 0
    assert sharded_norms == pytest.approx(one_norms, rel=1e-4)
    assert max(one_norms) > 0.5  # trainer.gradient_clip_val 0.5 clipped some of these steps
    # One TensorBoard event file and one adapter: only rank 0 writes.
    assert len(list((fsdp2_run / "tb").glob("events.out.tfevents.*"))) == 1
    assert (fsdp2_run / "adapter" / "adapter_model.safetensors").is_file()


def test_the_fsdp2_adapter_loads_in_stock_peft_with_the_trained_logits(fsdp2_run, tiny_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phi3lit.export.export import load_module

    module = load_module(fsdp2_run / "checkpoints" / "last.ckpt")
    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(fsdp2_run / "adapter")).eval()
    ids = torch.randint(3, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = module.model.eval()(input_ids=ids).logits
        got = peft(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in peft.named_parameters())


@pytest.mark.parametrize("processes", [2, 1], ids=["onto-2-processes", "onto-1-process"])
def test_a_stopped_fsdp2_run_resumes_exactly(stopped_run, fsdp2_run, small_data, tmp_path, processes):
    """Resumed from the gathered LoRA-only last.ckpt on 2 processes (FSDP2) or on 1 (plain, at twice the batch:
    the same rows per step), the run ends where the uninterrupted one did."""
    root = tmp_path / "resumed"
    shutil.copytree(stopped_run, root)
    fit(small_data, root, "--ckpt_path", "last", processes=processes, batch=BATCH * (3 - processes))
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS
    assert max_diff(lora_tensors(root), lora_tensors(fsdp2_run)) <= (1e-6 if processes == 2 else 1e-5)
    assert max_diff(lora_tensors(stopped_run), lora_tensors(fsdp2_run)) > 1e-4  # the resumed steps did train
    assert (root / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--trainer.plugins+=phi3lit.checkpoint.AtomicCheckpointIO"], "trainer.plugins: phi3lit.checkpoint"),
        (["--model.lora.targets", "[q, v]"], "adapts slices of qkv_proj"),
        (["--samples.prompts", "[hi]"], "samples.prompts: sample replies are generated on rank 0 alone"),
        (["--trainer.devices", "4"], "data_parallel_size=2: FSDP2 shards over all processes"),
        (["--trainer.strategy.init_args.tensor_parallel_size", "2"], "tensor_parallel_size=2: phi3lit shards"),
        (["--model.lora.modules_to_save", "[lm_head]"], "model.lora: lm_head trained under FSDP2 is not verified"),
        (["--model.compile", "true"], "model.compile=True: not supported under FSDP2"),
    ],
)
def test_fsdp2_refuses_what_it_does_not_cover_at_config_time(capsys, tmp_path, extra, says):
    args = ["fit", "--config", TINY, "--config", FSDP2, "--trainer.accelerator", "cpu", "--samples.prompts", "[]"]
    err = explain(capsys, [*args, "--trainer.default_root_dir", str(tmp_path), *extra])
    assert says in err
    assert len(err.strip().splitlines()) == 1


def test_a_one_process_checkpoint_is_refused_by_fsdp2_in_one_line(small_data, tmp_path):
    """The way that does not work (1 process -> FSDP2: the optimizer state is keyed by position) stops before any
    process starts, with the reason, and leaves the checkpoint as it was."""
    fit(small_data, tmp_path, "--trainer.max_steps", "2", processes=1, batch=2 * BATCH)
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    args = ["fit", "--config", TINY, "--config", FSDP2, "--trainer.accelerator", "cpu", "--data.train_file",
            str(small_data), "--data.max_length", "128", "--samples.prompts", "[]", "--trainer.max_steps", "4",
            "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "phi3lit", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "written by a run without FSDP2 (its optimizer state is keyed by position over the trainable" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("phi3lit: checkpoint error: --ckpt_path")  # one line
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before
