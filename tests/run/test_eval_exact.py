"""`validate` and `test` score every row exactly once, on any number of DDP processes.

DistributedSampler evens the ranks out by repeating rows; a validation set of 7 packed rows on 2 ranks holds 8
slots, and the repeated row used to be scored twice. The loss and accuracy are token-weighted over the whole set,
so 1 and 2 processes must agree to float rounding.
"""

import os
import subprocess
import sys

import pytest
from helpers import ROOT, TINY, run_main
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from phi3lit.tiny import TINY_DATA


def scalars(root, stage) -> dict[str, float]:
    acc = EventAccumulator(str(root / "tb"))
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"] if tag.startswith(f"{stage}/")}


@pytest.mark.parametrize("command, stage", [("validate", "val"), ("test", "test")])
def test_one_and_two_processes_score_the_same_rows_once(run_dir, small_data, tmp_path, command, stage):
    held_out = tmp_path / "held_out.jsonl"  # 13 conversations: 7 packed rows at 128 tokens, an odd number
    held_out.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[199:212]))
    key = "--data.val_file" if stage == "val" else "--data.test_file"
    args = [
        command, "--config", TINY, "--data.train_file", str(small_data), key, str(held_out),
        "--data.max_length", "128", "--data.batch_size", "2", "--samples.prompts", "[]",
        "--trainer.enable_progress_bar", "false", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
    ]  # fmt: skip
    one = run_main([*args, "--trainer.default_root_dir", str(tmp_path / "one")])
    assert f"{stage}: 13 examples -> 13 conversations" in one and "-> 7 packed rows" in one
    two = [*args, "--config", str(ROOT / "configs" / "strategy" / "ddp.yaml"), "--trainer.devices", "2"]
    two += ["--trainer.default_root_dir", str(tmp_path / "two")]
    proc = subprocess.run(  # Lightning's launcher re-runs the command line for rank 1: a real process
        [sys.executable, "-m", "phi3lit", *two], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = scalars(tmp_path / "one", stage), scalars(tmp_path / "two", stage)
    assert {f"{stage}/loss", f"{stage}/token_acc"} <= a.keys()
    for tag in (f"{stage}/loss", f"{stage}/token_acc", f"{stage}/ppl"):
        assert abs(a[tag] - b[tag]) <= 1e-6 * max(1.0, abs(a[tag])), (tag, a[tag], b[tag])


def test_val_batch_size_makes_runs_of_other_batch_sizes_score_the_same_rows(run_dir, small_data, tmp_path):
    """`limit_val_batches: 2` scores 2 x val_batch_size rows: with it fixed, runs that differ in `data.batch_size`
    (a sweep axis) score the same rows and give the same val loss for the same weights."""
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[199:212]))  # 7 packed rows
    args = [
        "validate", "--config", TINY, "--data.train_file", str(small_data), "--data.val_file", str(held_out),
        "--data.max_length", "128", "--data.val_batch_size", "2", "--trainer.limit_val_batches", "2",
        "--samples.prompts", "[]", "--trainer.enable_progress_bar", "false",
        "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
    ]  # fmt: skip
    losses = []
    for batch_size in (2, 4):
        root = tmp_path / f"bs{batch_size}"
        said = run_main([*args, "--data.batch_size", str(batch_size), "--trainer.default_root_dir", str(root)])
        assert "limit_val_batches=2 scores 4 of 7 packed rows" in said
        losses.append(scalars(root, "val")["val/loss"])
    assert losses[0] == losses[1]
