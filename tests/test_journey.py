"""The researcher's journey through the CLI: other loggers, resumes that change settings, logs that are files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from phi3lit.cli import main
from phi3lit.tiny import TINY_DATA

TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "d.jsonl"
    path.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[:60]))
    return path


def args(data, root, *extra):
    return [
        "fit", "--config", TINY, "--data.train_file", str(data), "--data.max_length", "128",
        "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]", "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1", *extra,
    ]  # fmt: skip


def csv_logger(save_dir) -> dict:
    return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(save_dir)}}


def csv_metrics(save_dir) -> list[dict]:
    (path,) = save_dir.glob("lightning_logs/version_*/metrics.csv")
    return list(csv.DictReader(path.open()))


def test_fit_with_csv_logger(small_data, tmp_path):
    main(args(small_data, tmp_path / "run", "--trainer.logger", json.dumps(csv_logger(tmp_path / "csv"))))
    rows = csv_metrics(tmp_path / "csv")
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    assert any(r.get("hp/val_loss") for r in rows)  # the end-of-fit results reach every logger
    (hparams,) = (tmp_path / "csv").glob("lightning_logs/version_*/hparams.yaml")
    assert yaml.safe_load(hparams.read_text())["model.lora.r"] == 16
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_fit_with_a_list_of_loggers(small_data, tmp_path):
    tensorboard = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(tmp_path / "run"), "name": "tb", "version": ""},
    }
    loggers = json.dumps([csv_logger(tmp_path / "csv"), tensorboard])  # TensorBoard second: found all the same
    main(args(small_data, tmp_path / "run", "--trainer.logger", loggers, "--samples.prompts", "[Hi]"))
    assert any(r.get("train/loss") for r in csv_metrics(tmp_path / "csv"))
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and acc.Tensors("samples/text_summary")
    # hp/* values exist only at the end of fit, never as a made-up 0 at step 0.
    assert [e.step for e in acc.Scalars("hp/val_loss")] == [4]
    assert (tmp_path / "run" / "curves.png").exists()


def test_resume_that_changes_lr_is_refused_then_accepted_and_the_config_is_kept(small_data, tmp_path, capsys):
    root = tmp_path / "run"
    main(args(small_data, root))
    original = (root / "config.yaml").read_text()
    resume = args(small_data, root, "--trainer.max_steps", "6", "--ckpt_path", "last", "--model.lr", "1e-4")
    with pytest.raises(SystemExit) as e:
        main(resume)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "phi3lit: checkpoint error:" in err and "model.lr: checkpoint 0.003, now 0.0001" in err
    assert "no effect" in err and "--accept_changes true" in err
    assert (root / "config.yaml").read_text() == original and not list(root.glob("config-resume-*"))
    main([*resume, "--accept_changes", "true"])
    assert (root / "config.yaml").read_text() == original  # never overwritten
    saved = yaml.safe_load((root / "config-resume-1.yaml").read_text())
    assert saved["model"]["lr"] == 1e-4 and saved["trainer"]["max_steps"] == 6 and saved["accept_changes"]


def test_logs_that_are_files_get_progress_lines_and_an_end_summary(small_data, tmp_path):
    log = tmp_path / "fit.log"
    cmd = [sys.executable, "-m", "phi3lit", *args(small_data, tmp_path / "run")]
    with log.open("w") as out:  # stdout is a file, as under SLURM or nohup
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("[phi3lit] step ")]
    assert [line.split(" | ")[0] for line in lines] == [f"[phi3lit] step {i}/4" for i in (1, 2, 3, 4)]
    assert all(" | loss " in line and " | lr " in line and " | ETA " in line for line in lines)
    assert " | val " in lines[-1] and " | tok/s " in lines[-1]
    assert "[phi3lit] fit done: step 4/4" in text
    assert "val loss    best " in text and "wall time" in text
    assert f"python -m phi3lit chat --adapter {tmp_path / 'run' / 'adapter'}" in text
