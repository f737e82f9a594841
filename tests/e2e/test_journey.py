"""The researcher's journey through the CLI: other loggers, resumes that change settings, logs that are files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from phi3lit.__main__ import main

TINY = str(ROOT / "configs" / "tiny.yaml")


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


def test_fit_with_csv_logger(small_data, tmp_path, capfd):
    bar = ["--trainer.enable_progress_bar", "true"]  # and the bar counts steps of max_steps, not epochs
    main(args(small_data, tmp_path / "run", "--trainer.logger", json.dumps(csv_logger(tmp_path / "csv")), *bar))
    out = capfd.readouterr().out
    assert "step: 100%" in out and "| 4/4 [" in out and "Epoch 0" not in out
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
    # Every scalar's step is the optimizer steps done, as in the checkpoints' names (step=000004.ckpt holds step 4).
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]
    assert "step" not in acc.Tags()["scalars"]
    assert (tmp_path / "run" / "curves.png").exists()


def test_resume_that_changes_lr_is_refused_then_accepted_and_the_config_is_kept(small_data, tmp_path, capsys):
    root = tmp_path / "run"
    main(args(small_data, root))
    original = (root / "config.yaml").read_text()
    resume = args(small_data, root, "--trainer.max_steps", "6", "--ckpt_path", "last", "--optimizer.lr", "1e-4")
    with pytest.raises(SystemExit) as e:
        main(resume)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "phi3lit: checkpoint error:" in err and "optimizer.init_args.lr: checkpoint 0.003, now 0.0001" in err
    assert "no effect" in err and "--accept_changes true" in err
    assert (root / "config.yaml").read_text() == original and not list(root.glob("config-resume-*"))
    main([*resume, "--accept_changes", "true"])
    assert (root / "config.yaml").read_text() == original  # never overwritten
    saved = yaml.safe_load((root / "config-resume-1.yaml").read_text())
    assert (
        saved["optimizer"]["init_args"]["lr"] == 1e-4 and saved["trainer"]["max_steps"] == 6 and saved["accept_changes"]
    )


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


COMMANDS = ["fit", "validate", "test", "predict", "data", "plan", "export", "chat", "ablate", "analyze", "tiny"]


def test_one_cli_every_command_listed_with_its_own_help(capsys):
    main(["--help"])
    top = capsys.readouterr().out
    assert top.startswith("usage: phi3lit COMMAND")
    assert all(f"\n  {c} " in top for c in COMMANDS)
    for command in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: phi3lit {command}" in out or f"usage: phi3lit [options] {command}" in out, command


def test_comma_separated_targets_suggest_the_list_syntax(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # its own run folder: the config's runs/tiny may hold the README's run
        main(["fit", "--config", TINY, "--model.lora.targets", "q,v", "--trainer.default_root_dir", str(tmp_path)])
    assert e.value.code == 2
    assert "write a list: --model.lora.targets '[q, v]'" in capsys.readouterr().err


def test_predict_keeps_earlier_output_and_says_where_it_wrote(small_data, tmp_path, capfd):
    root = tmp_path / "run"
    main(args(small_data, root, "--trainer.max_steps", "1"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 + 3?"}]}) + "\n")
    predict = ["predict", "--config", TINY, "--data.predict_file", str(prompts), "--model.max_new_tokens", "4"]
    predict += ["--trainer.default_root_dir", str(root), "--model.adapter", str(root / "adapter")]
    main(predict)
    first = (root / "predictions.jsonl").read_text()
    main(predict)
    assert (root / "predictions.jsonl").read_text() == first  # not overwritten
    assert (root / "predictions-2.jsonl").read_text().count("\n") == 1
    out = capfd.readouterr().out
    assert f"predictions written to {root / 'predictions.jsonl'}" in out
    assert f"predictions written to {root / 'predictions-2.jsonl'}" in out


REAL_TOKENIZER = ROOT.parent / "shared" / "phi3-tokenizer"


@pytest.mark.skipif(not REAL_TOKENIZER.is_dir(), reason="../shared/phi3-tokenizer is absent")
def test_tiny_model_of_your_own_tokenizer_trains_offline(small_data, tmp_path):
    """`tiny --tokenizer DIR --out DIR` then `fit --model.pretrained DIR`: a dry run on the real Phi-3 vocabulary."""
    model = tmp_path / "tiny-real-vocab"
    main(["tiny", "--tokenizer", str(REAL_TOKENIZER), "--out", str(model)])
    config = json.loads((model / "config.json").read_text())
    assert config["vocab_size"] == 32064 and config["num_hidden_layers"] == 2
    assert (model / "tokenizer.json").read_bytes() == (REAL_TOKENIZER / "tokenizer.json").read_bytes()
    main(args(small_data, tmp_path / "run", "--model.pretrained", str(model), "--trainer.max_steps", "2"))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_fast_dev_run_checks_one_step_and_writes_nothing(small_data, tmp_path, capfd):
    root = tmp_path / "run"
    main(args(small_data, root, "--trainer.fast_dev_run", "true"))
    assert "[phi3lit] check passed: config, data, model and 1 training step ran" in capfd.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == [".phi3lit.lock"]  # no checkpoint, adapter, logs or config
    main(args(small_data, root))  # the real run then starts in the same folder
    assert (root / "adapter" / "adapter_model.safetensors").exists()


def test_data_shows_the_example_asked_for(capsys):
    """`data --show longest|truncated|N`: the report's longest example is the one shown, with its marked spans."""
    skills = ["--data.train_file", str(ROOT / "phi3lit" / "assets" / "tiny_chat.jsonl"), "--data.val_file", "null"]
    base = ["data", "--config", TINY, *skills, "--data.max_length", "128"]  # the skill chats: some run over 128
    main([*base, "--show", "longest"])
    out = capsys.readouterr().out
    longest = int(out.split(" tokens before truncation")[0].rsplit("max ", 1)[1].replace(",", ""))
    assert f"({longest:,} before truncation)" in out and "[[" in out
    main([*base, "--show", "truncated", "--split", "val"])
    val = capsys.readouterr().out
    assert "val split of" in val and (": truncated, " in val or "no example was truncated" in val)
    main([*base, "--show", "3"])
    assert "\nexample 3: " in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*base, "--show", "shortest"])
    err = capsys.readouterr().err  # the parser's own refusal, in one line
    assert e.value.code == 2 and 'Parser key "show"' in err and "shortest" in err and len(err.splitlines()) == 1
