"""A stop at any moment, then `fit --ckpt_path last`, continues the uninterrupted run exactly: the same rows at
every step, the same learning rate at every step, the same final adapter. Likewise a run extended with a larger
`trainer.max_steps` reads the rows and follows the lr of one run of the new length.

No periodic checkpoint falls before the stops here (`checkpoint.every_n_train_steps` 50 on a 6-step run), so the
checkpoint a stop leaves is the one written at the stop itself: the case where Lightning's end-of-training
bookkeeping used to mark the epoch finished and the resume skipped the rest of it.
"""

import pytest
import torch
from helpers import TINY
from probes import probe_arg, read_probe

from phi3lit.__main__ import main

STEPS = 6


def fit_args(data, root, *extra):
    return [
        "fit", "--config", TINY, "--data.train_file", str(data), "--data.max_length", "128",
        "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "50", "--samples.prompts", "[]",
        "--checkpoint.every_n_train_steps", "50", "--model.lora.dropout", "0.0",
        # Warmup of one step, so the cosine (and so the lr at every step) depends on the run's length.
        "--lr_scheduler.init_args.warmup_steps", "1", "--trainer.default_root_dir", str(root), *extra,
    ]  # fmt: skip


def run(data, root, records, *extra):
    main(fit_args(data, root, *probe_arg("RecordRows", records), *probe_arg("OptimizerFacts", records), *extra))


def trace(records):
    """{step: (rows read, lr)} over the training steps recorded (a resumed step overwrites nothing: each step once)."""
    rows = {r["step"]: r["sources"] for r in read_probe(records) if r.get("stage") == "train"}
    lrs = {r["step"]: r["lr"] for r in read_probe(records) if "lr" in r}
    return {step: (rows[step], lrs[step]) for step in sorted(rows)}


def adapter(root):
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_same_adapter(a, b):
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    run(small_data, root, root / "records.jsonl", "--trainer.max_steps", str(STEPS))
    return root, trace(root / "records.jsonl")


@pytest.mark.parametrize("stops", [[3], [2, 4]], ids=["one-stop", "stopped-again-after-resume"])
def test_a_stop_by_signal_then_resume_gives_the_uninterrupted_run(small_data, uninterrupted, tmp_path, stops):
    reference_root, reference = uninterrupted
    records = tmp_path / "records.jsonl"
    for i, stop in enumerate(stops):
        resume = ["--ckpt_path", "last"] if i else []
        stop_there = probe_arg("SignalAt", records, step=stop)
        run(small_data, tmp_path, records, "--trainer.max_steps", str(STEPS), *stop_there, *resume)
        saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        assert saved["global_step"] == stop
        assert not (tmp_path / "adapter").exists()  # unfinished
    run(small_data, tmp_path, records, "--trainer.max_steps", str(STEPS), "--ckpt_path", "last")
    assert trace(records) == reference  # rows and lr at every step
    assert_same_adapter(adapter(tmp_path), adapter(reference_root))


def test_an_extended_run_reads_the_rows_and_lr_of_one_run_of_the_new_length(small_data, uninterrupted, tmp_path):
    reference_root, reference = uninterrupted
    records = tmp_path / "records.jsonl"
    run(small_data, tmp_path, records, "--trainer.max_steps", "3")
    first = trace(records)
    assert [rows for rows, _ in first.values()] == [reference[s][0] for s in range(3)]
    assert (tmp_path / "adapter").is_dir()  # a finished 3-step run
    records.unlink()
    run(small_data, tmp_path, records, "--trainer.max_steps", str(STEPS), "--ckpt_path", "last")
    extended = trace(records)
    assert sorted(extended) == [3, 4, 5]
    for step in (3, 4, 5):
        assert extended[step][0] == reference[step][0], f"rows at step {step}"
        assert extended[step][1] == pytest.approx(reference[step][1], rel=1e-9), f"lr at step {step}"


def test_a_stop_asked_by_early_stopping_at_a_validation_resumes_exactly(small_data, uninterrupted, tmp_path):
    """EarlyStopping stops the fit from a validation mid-epoch (here: any val loss below 100 stops at the first
    one, step 3); resumed without it, the run continues the epoch with the uninterrupted run's rows and lr."""
    import json

    reference_root, reference = uninterrupted
    records = tmp_path / "records.jsonl"
    stop = {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
            "init_args": {"monitor": "val/loss", "stopping_threshold": 100.0}}  # fmt: skip
    every_3 = ["--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1"]
    run(small_data, tmp_path, records, "--trainer.max_steps", str(STEPS), *every_3,
        f"--trainer.callbacks+={json.dumps(stop)}")  # fmt: skip
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    run(small_data, tmp_path, records, "--trainer.max_steps", str(STEPS), *every_3, "--ckpt_path", "last")
    assert trace(records) == reference  # rows and lr at every step
    assert_same_adapter(adapter(tmp_path), adapter(reference_root))
