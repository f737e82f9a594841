"""Mid-epoch resume with another batch size or number of processes reads every row exactly once.

An uninterrupted run is compared with an interrupted one, resumed with `--ckpt_path last`, by the conversations each
trained micro-batch held (the `RecordRows` probe), in order.
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT
from probes import probe_arg, read_probe

from phi3lit.__main__ import main
from phi3lit.tiny import TINY_DATA

TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[:60]))  # 30+ rows of 128: one epoch
    return path


def common(data, root, rows, cache):
    return [
        "--config", TINY, "--data.train_file", str(data), "--data.val_fraction", "0", "--data.max_length", "128",
        "--data.cache_dir", str(cache), "--model.lora.dropout", "0", "--checkpoint.every_n_train_steps", "1",
        "--samples.prompts", "[]", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
        *probe_arg("RecordRows", rows),
    ]  # fmt: skip


def fit(data, root, rows, cache, batch_size, max_steps, *extra):
    args = ["--data.batch_size", str(batch_size), "--trainer.max_steps", str(max_steps), *extra]
    main(["fit", *common(data, root, rows, cache), *args])


def trained(rows) -> list[str]:
    return [s for r in read_probe(rows) if r["stage"] == "train" for s in r["sources"]]


class Trained(list):
    """The trained conversations of a run, in order; `rows` is its probe file."""

    rows = None


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("a")
    fit(data, tmp / "run", tmp / "rows.jsonl", tmp / "cache", 2, 8)  # 16 rows
    out = Trained(trained(tmp / "rows.jsonl"))
    out.rows = tmp / "rows.jsonl"
    return out


@pytest.mark.parametrize("new_batch_size", [1, 3])
def test_resume_with_another_batch_size_reads_each_row_once(data, uninterrupted, tmp_path, new_batch_size, caplog):
    root, rows, cache = tmp_path / "run", tmp_path / "rows.jsonl", tmp_path / "cache"
    fit(data, root, rows, cache, 2, 3)  # 6 rows, stopped mid-epoch
    resumed = 3 + 6 // new_batch_size  # 6 more rows in batches of the new size (steps count micro-batches)
    fit(data, root, rows, cache, new_batch_size, resumed, "--ckpt_path", "last")
    assert "[phi3lit] train: resuming epoch 0 after 6 of its " in caplog.text
    assert f"the rest in batches of {new_batch_size} on 1 device(s)" in caplog.text
    fit(data, root, rows, cache, 2, resumed + 2, "--ckpt_path", "last")  # and back: 4 more rows
    assert len(uninterrupted) == len(set(uninterrupted)) >= 16  # 16 rows of one epoch: no conversation twice
    assert trained(rows) == uninterrupted
    position = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["ChatDataModule"]["train_position"]
    assert position["epoch"] == 0 and position["samples"] == 16


def test_resume_on_edited_data_is_refused_and_the_checkpoint_kept(data, tmp_path, capsys):
    edited = tmp_path / "d.jsonl"  # the same file name and settings, other contents
    edited.write_text(data.read_text())
    root, rows, cache = tmp_path / "run", tmp_path / "rows.jsonl", tmp_path / "cache"
    fit(edited, root, rows, cache, 2, 2)
    last = root / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    lines = edited.read_text().splitlines(keepends=True)
    edited.write_text(
        "".join(
            lines[:30]
            + [lines[30].replace('"assistant", "content": "', '"assistant", "content": "Well. ')]
            + lines[31:]
        )
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fit(edited, root, rows, cache, 2, 4, "--ckpt_path", "last")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "phi3lit: checkpoint error: the checkpoint was trained on other data or data settings" in err
    assert "data.train_data: checkpoint '60 conversations, sha256 " in err and "now '60 conversations, sha256 " in err
    assert "data.val_data" not in err and "data.seed" not in err  # only what differs
    assert err.rstrip().endswith("Pass --accept_changes true to resume anyway") and "Traceback" not in err
    assert last.read_bytes() == before
    assert [r["step"] for r in read_probe(rows) if r["stage"] == "train"] == [0, 1]  # nothing trained after

    fit(edited, root, rows, cache, 2, 4, "--ckpt_path", "last", "--accept_changes", "true")  # knowingly
    assert [r["step"] for r in read_probe(rows) if r["stage"] == "train"] == [0, 1, 2, 3]


@pytest.mark.slow  # two DDP processes on the CPU (gloo) and three single-process runs: 1-2 minutes
def test_resume_across_one_and_two_processes_reads_each_row_once(data, uninterrupted, tmp_path):
    root, rows, cache = tmp_path / "run", tmp_path / "rows.jsonl", tmp_path / "cache"
    fit(data, root, rows, cache, 2, 2)  # rows 0-3 of the epoch's order, one process
    cmd = [
        sys.executable, "-m", "phi3lit", "fit", *common(data, root, rows, cache), "--data.batch_size", "2",
        "--trainer.max_steps", "4", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--ckpt_path", "last",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]  # rows 4-11 on two ranks: 4 per step
    fit(data, root, rows, cache, 2, 6, "--ckpt_path", "last")  # rows 12-15, one process again

    records = [r for r in read_probe(rows) if r["stage"] == "train"]
    steps = {}
    for r in records:
        steps.setdefault(r["step"], []).extend(r["sources"])
    one = {}  # the uninterrupted run's conversations by step (2 rows per step)
    for r in read_probe(uninterrupted.rows):
        if r["stage"] == "train":
            one.setdefault(r["step"], []).extend(r["sources"])
    assert [steps[0], steps[1]] == [one[0], one[1]]
    # Under DDP a step reads 4 consecutive positions of the epoch's order: two single-process steps' rows.
    assert sorted(steps[2]) == sorted(one[2] + one[3]) and sorted(steps[3]) == sorted(one[4] + one[5])
    assert {r["rank"] for r in records if r["step"] in (2, 3)} == {0, 1}
    assert [steps[4], steps[5]] == [one[6], one[7]]
    assert sorted(s for r in records for s in r["sources"]) == sorted(uninterrupted)  # nothing skipped or repeated


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n_rows", [17, 18])
def test_resumed_ranks_read_the_rest_of_the_global_order(world, n_rows):
    """Whatever ranks and batch size read the first positions, the new ranks read exactly the rest, in order."""
    from torch.utils.data import DistributedSampler

    from phi3lit.data import ResumableSampler

    def sampler(rank, resume=None):
        s = ResumableSampler(range(n_rows), num_replicas=world, rank=rank, shuffle=True, seed=5)
        s.set_epoch(1)
        s.resume = resume
        return s

    order = sampler(0).global_order()
    for consumed in (0, 4, 12, 17, 30):  # positions of the epoch's order read before the resume, on all ranks
        shares = [list(sampler(rank, (1, consumed))) for rank in range(world)]
        rest = order[consumed:]
        assert len({len(s) for s in shares}) == 1  # equal steps per rank, or DDP would hang
        assert sum(map(len, shares)) == -(-len(rest) // world) * world  # padded as DistributedSampler pads
        assert [s[j] for j in range(len(shares[0])) for s in shares][: len(rest)] == rest
    for rank in range(world):  # not resumed: exactly DistributedSampler's shares
        theirs = DistributedSampler(range(n_rows), num_replicas=world, rank=rank, shuffle=True, seed=5)
        theirs.set_epoch(1)
        assert list(sampler(rank)) == list(theirs)
