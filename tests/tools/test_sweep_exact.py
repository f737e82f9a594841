"""ablate you can trust: a batch-size sweep compared at equal tokens on the same validation rows, a point killed
between its step and last checkpoints completes on a rerun, sweep and value names stay inside the sweep folder
(and distinct), and symlinks planted at the lock files are refused, never followed."""

import csv
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, wait_until_unlocked

from phi3lit.run.events import read_scalars

TINY = str(ROOT / "configs" / "tiny.yaml")
QUICK = {  # a few steps of the tiny model on the small data: seconds per point
    "data.max_length": 128, "samples.prompts": [], "trainer.enable_progress_bar": False, "monitor.plot": False,
}  # fmt: skip


def ablate(*args, timeout=900):
    cmd = [sys.executable, "-m", "phi3lit", "ablate", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def write_sweep(path: Path, **sweep) -> Path:
    path.write_text(yaml.safe_dump({"base": TINY, "root": str(path.parent / "runs"), **sweep}))
    return path


# ---------------------------------------------------------------------------- equal tokens, same rows
def test_batch_size_sweep_compares_at_equal_tokens_on_the_same_validation_rows(small_data, tmp_path):
    fixed = {
        **QUICK, "data.train_file": str(small_data), "data.val_fraction": 0.3, "trainer.max_steps": 6,
        "trainer.val_check_interval": 3, "trainer.limit_val_batches": 1, "checkpoint.every_n_train_steps": 6,
    }  # fmt: skip
    sweep = write_sweep(tmp_path / "bs.yaml", grid={"data.batch_size": [4, 6]}, fixed=fixed)
    proc = ablate(sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs" / "bs"
    rows = {r["batch_size"]: r for r in csv.DictReader((out / "summary.csv").open())}
    per_step = {"4": 4 * 128, "6": 6 * 128}  # token slots per step: batch x max_length
    # Both points validated at steps 3 and 6: batch 4 at 1,536 and 3,072 tokens, batch 6 at 2,304 and 4,608.
    # The largest count both reached is 3,072: batch 4 measured there, batch 6 interpolated between 2,304 and 4,608.
    assert rows["4"]["eq_tokens"] == rows["6"]["eq_tokens"] == "3072"
    assert (rows["4"]["eq_measured_at"], rows["4"]["eq_method"]) == ("3072", "measured")
    assert (rows["6"]["eq_measured_at"], rows["6"]["eq_method"]) == ("2304..4608", "interpolated")
    for bs, row in rows.items():
        curve = {step * per_step[bs]: v for step, v in read_scalars(str(out / f"batch_size={bs}" / "tb"))["val/loss"]}
        if bs == "4":
            expected = curve[3072]
        else:
            expected = curve[2304] + (curve[4608] - curve[2304]) * (3072 - 2304) / (4608 - 2304)
        assert float(row["eq_val_loss"]) == pytest.approx(expected, abs=1e-4)
    assert "2304..4608" in (out / "summary.md").read_text()  # where each value comes from, beside it
    # limit_val_batches: 1 scores the same validation rows at both batch sizes (one validation batch size).
    scored = {}
    for bs in per_step:
        log = (out / f"batch_size={bs}" / "fit.log").read_text()
        scored[bs] = re.findall(r"\[phi3lit\] val: limit_val_batches=1 scores .*", log)
        assert scored[bs], log[-3000:]
    assert scored["4"] == scored["6"] and "scores 4 of" in scored["4"][0], scored


# ---------------------------------------------------------------------------- killed between two checkpoint writes
def test_point_killed_between_step_and_last_checkpoint_completes_on_rerun(small_data, tmp_path):
    """Needs `fit --ckpt_path last` to resume from the newest intact step=N.ckpt when last.ckpt is missing."""
    fixed = {
        **QUICK, "data.train_file": str(small_data), "trainer.max_steps": 6, "trainer.val_check_interval": 3,
        "checkpoint.every_n_train_steps": 2,
    }  # fmt: skip
    sweep = write_sweep(tmp_path / "kill.yaml", grid={"model.lora.r": [4]}, fixed=fixed)
    point = tmp_path / "runs" / "kill" / "r=4"
    cmd = [sys.executable, "-m", "phi3lit", "ablate", str(sweep)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (point / "checkpoints" / "step=000002.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its fit child
    proc.wait()
    wait_until_unlocked(point / ".ablate.lock", deadline)  # the fit child dies a moment after the sweep
    # As if killed after the first step=N.ckpt and before last.ckpt: only step checkpoints are left.
    (point / "checkpoints" / "last.ckpt").unlink(missing_ok=True)
    assert not (point / "checkpoints" / "last.ckpt").exists() and list((point / "checkpoints").glob("step=*.ckpt"))
    dry = ablate(sweep, "--dry_run", "true")
    assert "--ckpt_path last" in dry.stdout and "would resume" in dry.stdout, dry.stdout
    rerun = ablate(sweep)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + (point / "fit.log").read_text()[-3000:]
    assert "resuming" in rerun.stdout
    rows = list(csv.DictReader((tmp_path / "runs" / "kill" / "summary.csv").open()))
    assert rows[0]["status"] == "ok"


# ---------------------------------------------------------------------------- folder names
def test_sweep_and_value_names_stay_inside_the_sweep_folder_and_distinct(tmp_path):
    root = tmp_path / "runs"
    data = ["a/b.jsonl", "a_b.jsonl", "a:b.jsonl", "../../up.jsonl", ".hidden", "x" * 300]
    sweep = write_sweep(tmp_path / "s.yaml", name="../../escape", grid={"data.train_file": data}, fixed=QUICK)
    listed = ablate(sweep, "--list", "true")
    assert listed.returncode == 0, listed.stderr
    names = [line.split("\t")[1] for line in listed.stdout.strip().splitlines()]
    assert len(names) == len(set(names)) == len(data)  # a/b, a_b and a:b: three folders
    assert names[1] == "train_file=a_b.jsonl"  # a safe value keeps its name (existing sweeps keep their folders)
    for name in names:
        assert "/" not in name and ".." not in name and not name.startswith(".") and len(name.encode()) < 200
    dry = ablate(sweep, "--dry_run", "true").stdout.strip().splitlines()
    commands = [shlex.split(line) for line in dry[1::2]]
    for words, value in zip(commands, data, strict=True):
        folder = Path(words[words.index("--trainer.default_root_dir") + 1])
        assert folder.parent.parent == root and folder.resolve().is_relative_to(root.resolve())
        assert words[words.index("--data.train_file") + 1] == value  # fit gets the raw value; only folders change
    assert not any(tmp_path.parent.glob("escape*")) and not any(tmp_path.glob("escape*"))


# ---------------------------------------------------------------------------- planted symlinks
@pytest.mark.parametrize("lock", [".ablate.lock", ".phi3lit.lock"])
def test_a_symlinked_lock_is_refused_in_one_line_and_its_target_untouched(small_data, tmp_path, lock):
    fixed = {**QUICK, "data.train_file": str(small_data), "trainer.max_steps": 1}
    sweep = write_sweep(tmp_path / "sl.yaml", grid={"model.lora.r": [4]}, fixed=fixed)
    point = tmp_path / "runs" / "sl" / "r=4"
    point.mkdir(parents=True)
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (point / lock).symlink_to(target)
    proc = ablate(sweep, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, proc.stdout + err
    assert f"{point / lock}: is a symbolic link; ablate does not follow it" in err
    assert target.read_text() == "keep me\n" and not (point / "checkpoints").exists()  # nothing written or run
