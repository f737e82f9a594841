"""ablate: a 2x2 sweep on the tiny model; skip finished points, resume killed ones, --list/--index agree."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT

from phi3lit.ablate import load_sweep, points
from phi3lit.tiny import TINY_DATA


def hand_count(r, targets):  # tiny shape, 2 layers: see test_lora.py
    h, i = 256, 512
    size = {"q+v": 2 * r * (h + h), "all-linear": r * (h + 3 * h) + r * (h + h) + r * (h + 2 * i) + r * (i + h)}
    return 2 * size[targets]


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    data = tmp / "d.jsonl"
    data.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[:60]))
    sweep = {
        "base": str(ROOT / "configs" / "tiny.yaml"),
        "root": str(tmp / "runs"),
        "grid": {"model.lora.r": [4, 8], "model.lora.targets": [["q", "v"], "all-linear"]},
        "fixed": {
            "data.train_file": str(data), "data.max_length": 128, "trainer.max_steps": 6,
            "trainer.val_check_interval": 3, "checkpoint.every_n_train_steps": 1, "samples.prompts": [],
            "trainer.enable_progress_bar": False,
        },
    }  # fmt: skip
    path = tmp / "mini.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def ablate(*args, **kw):
    cmd = [sys.executable, "-m", "phi3lit", "ablate", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, **kw)


def test_sweep_runs_summarizes_and_skips_finished_points(sweep_file):
    proc = ablate(sweep_file)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = sweep_file.parent / "runs" / "mini"
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == sorted(p["name"] for p in points(load_sweep(sweep_file)))
    assert all((out / f / "tb").is_dir() and (out / f / "adapter").is_dir() for f in folders)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert int(r["trainable_params"]) == hand_count(int(r["r"]), r["targets"])
        assert float(r["final_val_loss"]) > 0 and float(r["adapter_mb"]) > 0
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG" and (out / "summary.md").exists()

    before = {f: sorted(p.name for p in (out / f / "checkpoints").iterdir()) for f in folders}
    again = ablate(sweep_file)
    assert again.returncode == 0
    assert again.stdout.count("done, skipped") == 4  # no new training steps
    assert before == {f: sorted(p.name for p in (out / f / "checkpoints").iterdir()) for f in folders}


def test_list_and_index_agree(sweep_file, tmp_path):
    listed = ablate(sweep_file, "--list", "--root", tmp_path).stdout.strip().splitlines()
    names = [line.split("\t")[1] for line in listed]
    assert [line.split("\t")[0] for line in listed] == ["0", "1", "2", "3"]
    proc = ablate(sweep_file, "--index", 2, "--root", tmp_path)
    assert proc.returncode == 0
    ran = [p.name for p in (tmp_path / "mini").iterdir() if p.is_dir()]
    assert ran == [names[2]]
    assert "ok" in ablate(sweep_file, "--list", "--root", tmp_path).stdout.splitlines()[2]


def test_killed_sweep_completes_on_rerun(sweep_file, tmp_path):
    cmd = [sys.executable, "-m", "phi3lit", "ablate", str(sweep_file), "--root", str(tmp_path), "--index", "3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    point = tmp_path / "mini" / points(load_sweep(sweep_file))[3]["name"]
    deadline = time.monotonic() + 300
    while not (point / "checkpoints" / "step=000002.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its fit child, mid-point
    proc.wait()
    rerun = ablate(sweep_file, "--root", tmp_path, "--index", "3")
    assert rerun.returncode == 0 and "resuming" in rerun.stdout
    rows = list(csv.DictReader((tmp_path / "mini" / "summary.csv").open()))
    assert rows[3]["status"] == "ok"


def test_failed_point_is_recorded_and_the_sweep_goes_on(sweep_file, tmp_path):
    sweep = yaml.safe_load(sweep_file.read_text())
    sweep["grid"] = {"model.lora.r": [4, -1]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(sweep))
    proc = ablate(bad, "--root", tmp_path)
    assert proc.returncode == 0 and "1 ok, 1 failed" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "bad" / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "failed"]
    status = (tmp_path / "bad" / "r=-1" / "status.json").read_text()
    assert "model.lora.r must be positive" in status
