"""`optimizer:` / `lr_scheduler:`: LightningCLI's standard keys, through `fit` as a user runs it and in a sweep."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import run_main
from probes import probe_arg, read_probe

from phi3lit.__main__ import main
from phi3lit.model.optim import WarmupCosine

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def fit(data, root, *extra):
    return [
        "fit", "--config", TINY, "--data.train_file", str(data), "--data.max_length", "128",
        "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]", "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", *extra,
    ]  # fmt: skip


def test_default_is_fused_adamw_with_per_step_warmup_cosine(small_data, tmp_path):
    """tiny.yaml: lr 3e-3, 10 warmup steps, cosine to 0.1 over max_steps; the lr moves every optimizer step."""
    out = tmp_path / "opt.jsonl"
    main(fit(small_data, tmp_path / "run", *probe_arg("OptimizerFacts", out)))
    steps = read_probe(out)
    assert [s["optimizer"] for s in steps] == ["AdamW"] * 4
    assert {s["scheduler"] for s in steps} == {"WarmupCosine"} and {s["interval"] for s in steps} == {"step"}
    assert [s["lr"] for s in steps] == pytest.approx([3e-3 * (k + 1) / 11 for k in range(4)])  # warmup 10 > 4 steps
    assert {s["weight_decay"] for s in steps} == {0.0}


def test_optimizer_and_schedule_are_swapped_from_the_command_line(small_data, tmp_path):
    out = tmp_path / "opt.jsonl"
    extra = [
        "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.05", "--optimizer.momentum", "0.9",
        "--optimizer.fused", "null", "--lr_scheduler", "torch.optim.lr_scheduler.StepLR",
        "--lr_scheduler.step_size", "2", "--lr_scheduler.gamma", "0.5",
    ]  # fmt: skip
    main(fit(small_data, tmp_path / "run", *extra, *probe_arg("OptimizerFacts", out)))
    steps = read_probe(out)
    assert [s["optimizer"] for s in steps] == ["SGD"] * 4 and {s["momentum"] for s in steps} == {0.9}
    assert [s["lr"] for s in steps] == pytest.approx([0.05, 0.05, 0.025, 0.025])  # stepped per optimizer step
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optimizer"]["class_path"] == "torch.optim.SGD" and saved["lr_scheduler"]["init_args"]["gamma"] == 0.5


def test_another_optimizer_says_it_keeps_the_default_fused_setting(small_data, tmp_path):
    """`--optimizer torch.optim.SGD` alone keeps AdamW's `fused: true` (jsonargparse carries shared init_args):
    the run says so, and the optimizer that runs is fused; with `--optimizer.fused null` it is not, silently."""
    out = tmp_path / "opt.jsonl"
    said = run_main(
        fit(small_data, tmp_path / "a", "--optimizer", "torch.optim.SGD", *probe_arg("OptimizerFacts", out))
    )
    assert "optimizer torch.optim.SGD runs with fused=True" in said
    assert {s["fused"] for s in read_probe(out)} == {True}
    out.unlink()
    extra = ["--optimizer", "torch.optim.SGD", "--optimizer.fused", "null", *probe_arg("OptimizerFacts", out)]
    said = run_main(fit(small_data, tmp_path / "b", *extra))
    assert "runs with fused=True" not in said and {s["fused"] for s in read_probe(out)} == {None}


def test_warmup_cosine_reaches_min_lr_ratio_on_the_last_step():
    import torch

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = WarmupCosine(opt, warmup_ratio=0.2, min_lr_ratio=0.1)
    sched.set_total_steps(10)  # warmup = 2 steps
    lrs = []
    for _ in range(10):  # the run's steps 0..9: the lr each one uses
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    # The decay spans steps 2..9 and ends on the last step the run takes, not one after it.
    assert lrs[9] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))


def test_sweep_grid_ablates_the_optimizer(small_data, tmp_path):
    """A sweep axis over `optimizer`: each point's run trains with its optimizer (read back from its config)."""
    sweep = {
        "base": TINY,
        "name": "opt",
        "root": str(tmp_path),
        "grid": {"optimizer": ["torch.optim.AdamW", "torch.optim.SGD"]},
        "fixed": {
            "data.train_file": str(small_data), "data.max_length": 128, "trainer.max_steps": 2,
            "trainer.val_check_interval": 2, "trainer.limit_val_batches": 1, "samples.prompts": [],
            "optimizer.fused": None, "monitor.plot": False,
        },
    }  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run(
        [sys.executable, "-m", "phi3lit", "ablate", str(path)], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    configs = sorted((tmp_path / "opt").glob("*/config.yaml"))
    classes = sorted(yaml.safe_load(c.read_text())["optimizer"]["class_path"] for c in configs)
    assert classes == ["torch.optim.AdamW", "torch.optim.SGD"]


def test_a_non_fused_optimizer_still_never_applies_a_nonfinite_step(small_data, tmp_path, caplog):
    """SGD has no `found_inf`: the guard drops a bad step's gradients instead, so the weights stay finite."""
    import torch

    root = tmp_path / "run"
    extra = [
        "--optimizer", "torch.optim.SGD", "--optimizer.lr", "1e30", "--optimizer.fused", "null",
        "--trainer.gradient_clip_val", "null", "--model.on_nonfinite", "skip", "--trainer.log_every_n_steps", "1",
    ]  # fmt: skip
    main(fit(small_data, root, *extra))
    assert "[phi3lit] skipped step" in caplog.text
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all(torch.isfinite(v).all() for v in state.values())
