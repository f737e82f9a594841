"""ablate: a 2x2 sweep on the tiny model; skip finished points, resume killed ones, --list and --index; a failed
point fails the command; bad sweep files are one-line config errors; --dry-run, result lines, summary, plot;
alpha rules; a point taken by another worker is skipped. (Seeds, statistics and analyze: test_analyze.py.)"""

import csv
import fcntl
import importlib.util
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time

import pytest
import yaml
from helpers import ROOT, wait_until_unlocked

from phi3lit.__main__ import main
from phi3lit.errors import ConfigError
from phi3lit.run.events import read_scalars
from phi3lit.tiny import TINY_DATA
from phi3lit.tools.sweep import ablate as ablate_module
from phi3lit.tools.sweep.grid import effective_scale, fit_args, load_sweep, point_dir, points
from phi3lit.tools.sweep.summary import summary_figure


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
            "data.train_file": str(data), "data.val_file": None, "data.max_length": 128, "trainer.max_steps": 6,
            "trainer.log_every_n_steps": 2,
            "trainer.val_check_interval": 3, "checkpoint.every_n_train_steps": 1, "samples.prompts": [],
            "trainer.enable_progress_bar": False, "monitor.plot": False,  # curves.png: tested on the main run
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
    # One result line per finished point, in order, with its numbers.
    result = r"^\[ablate\] \d/4 (\S+): ok  best_val_loss=[\d.]+ final_val_loss=[\d.]+ tokens_per_sec=\d+ wall_s=[\d.]+$"
    assert re.findall(result, proc.stdout, re.M) == [p["name"] for p in points(load_sweep(sweep_file))], proc.stdout
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


def test_list_names_every_point_in_order(sweep_file, tmp_path):
    listed = ablate(sweep_file, "--list", "true", "--root", tmp_path).stdout.strip().splitlines()
    assert [line.split("\t") for line in listed] == [
        [str(i), p["name"], "pending"] for i, p in enumerate(points(load_sweep(sweep_file)))
    ]


def test_killed_sweep_completes_on_rerun_and_index_runs_that_point_alone(sweep_file, tmp_path):
    cmd = [sys.executable, "-m", "phi3lit", "ablate", str(sweep_file), "--root", str(tmp_path), "--index", "3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    names = [p["name"] for p in points(load_sweep(sweep_file))]
    point = tmp_path / "mini" / names[3]
    deadline = time.monotonic() + 300
    while not (point / "checkpoints" / "step=000002.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its fit child, mid-point
    proc.wait()
    # The fit child (which holds the point's lock too) dies a moment after the sweep: until then a rerun would
    # rightly say the point is running in another process.
    wait_until_unlocked(point / ".ablate.lock", deadline)
    rerun = ablate(sweep_file, "--root", tmp_path, "--index", "3")
    assert rerun.returncode == 0 and "resuming" in rerun.stdout
    rows = list(csv.DictReader((tmp_path / "mini" / "summary.csv").open()))
    assert rows[3]["status"] == "ok"
    assert [p.name for p in (tmp_path / "mini").iterdir() if p.is_dir()] == [names[3]]  # --index ran that one
    listed = ablate(sweep_file, "--list", "true", "--root", tmp_path).stdout.strip().splitlines()
    assert [line.split("\t")[2] for line in listed] == ["pending", "pending", "pending", "ok"]


def test_failed_point_fails_the_command_after_the_sweep_goes_on(sweep_file, tmp_path):
    sweep = yaml.safe_load(sweep_file.read_text())
    sweep["grid"] = {"model.lora.r": [4, -1]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(sweep))
    log = tmp_path / "ablate.log"  # as a batch job's log file
    cmd = [sys.executable, "-m", "phi3lit", "ablate", str(bad), "--root", str(tmp_path)]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    second = tmp_path / "bad" / "r=-1" / "status.json"
    while not second.exists() and proc.poll() is None:
        time.sleep(0.05)
    # The first point's result is in the log file while the sweep is still busy with the second.
    assert re.search(r"^\[ablate\] 1/2 r=4: ok  best_val_loss=[\d.]+ ", log.read_text(), re.M), log.read_text()
    assert proc.wait(timeout=900) == 1 and "1 ok, 1 failed" in log.read_text(), log.read_text()[-3000:]
    failed_line = r"^\[ablate\] 2/2 r=-1: FAILED \(exit \d+; see .*fit.log\)  best_val_loss=- "
    assert re.search(failed_line, log.read_text(), re.M), log.read_text()
    rows = list(csv.DictReader((tmp_path / "bad" / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "failed"]
    status = (tmp_path / "bad" / "r=-1" / "status.json").read_text()
    assert "model.lora.r must be positive" in status

    # One point per SLURM array task: the failing point's task fails, the good point's task does not.
    assert ablate(bad, "--root", tmp_path, "--index", 1).returncode == 1
    assert ablate(bad, "--root", tmp_path, "--index", 0).returncode == 0


TINY_BASE = str(ROOT / "configs" / "tiny.yaml")
# The learning rate's key: `optimizer.lr` once the optimizer is configurable (an `optimizer:` section), else model.lr.
LR_KEY = "optimizer.lr" if "\noptimizer:" in (ROOT / "configs" / "tiny.yaml").read_text() else "model.lr"
GRID = "grid: {model.lora.r: [4, 8]}\n"
BAD_SWEEPS = {  # file text -> what the one-line message must say after `<file>: `
    "syntax": ("base: x.yaml\ngrid: {model.lora.r: [4, 8}\n", "not valid YAML"),
    "no_grid": (f"base: {TINY_BASE}\n", "no `grid:`"),
    "no_base": (GRID, "no `base:`"),
    "base_missing": ("base: configs/no_such.yaml\n" + GRID, "base: configs/no_such.yaml does not exist"),
    "value_not_list": (f"base: {TINY_BASE}\ngrid: {{model.lora.r: 4}}\n", "grid: model.lora.r: must be a non-empty"),
    "alpha_rule": (f"base: {TINY_BASE}\ngrid: {{model.lora.alpha: [32, 2q]}}\n", "'2q' is not an alpha rule"),
    "rslora_twice": (
        f"base: {TINY_BASE}\ngrid: {{model.lora.alpha: [rslora]}}\nfixed: {{model.lora.use_rslora: false}}\n",
        "rslora sets model.lora.use_rslora",
    ),
    "eval_not_tasks": (f"base: {TINY_BASE}\ngrid: {{model.lora.r: [4]}}\neval: phi3lit_demo\n", "eval: must be a list"),
    "eval_limit": (f"base: {TINY_BASE}\ngrid: {{model.lora.r: [4]}}\neval: {{tasks: [a], limit: 0}}\n",
                   "eval: limit: must be a positive number"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_SWEEPS)
def test_bad_sweep_file_is_a_one_line_config_error(case, tmp_path):
    text, expected = BAD_SWEEPS[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        ablate_module.ablate(str(path), list=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path)) and expected in message, message


def test_missing_sweep_file_through_the_cli(tmp_path):
    path = tmp_path / "no_such_sweep.yaml"
    proc = ablate(path)
    assert proc.returncode == 2 and not (tmp_path / "runs").exists()
    message = f"{path}: cannot read the sweep file (No such file or directory)"
    assert proc.stderr.strip() == f"phi3lit: config error: {message}"  # one line, no traceback


def test_dry_run_prints_each_points_fit_command(sweep_file, tmp_path, capsys):
    proc = ablate(sweep_file, "--dry_run", "true", "--root", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec = load_sweep(sweep_file)
    spec["root"] = str(tmp_path)
    pts, lines = points(spec), proc.stdout.strip().splitlines()
    assert len(lines) == 2 * len(pts), proc.stdout  # a header and a command per point, not the resolved config
    for i, p in enumerate(pts):
        assert lines[2 * i] == f"# {i} {p['name']} (pending)"
        assert shlex.split(lines[2 * i + 1]) == ["python", "-m", "phi3lit", *fit_args(spec, p, resume=False)]
    assert "--model.lora.r 4 --model.lora.targets '[q, v]'" in lines[1]  # overrides as a user types them
    assert not (tmp_path / "mini").exists()  # nothing ran
    words = shlex.split(lines[3])  # the command as a shell splits it, through the CLI's entry point
    with pytest.raises(SystemExit) as e:
        main([*words[3:], "--print_config"])
    assert e.value.code == 0 and f"default_root_dir: {tmp_path / 'mini' / pts[1]['name']}" in capsys.readouterr().out


def test_lr_sweep_summary_has_steady_tokens_per_sec_a_log10_lr_plot_and_eval_scores(sweep_file, tmp_path):
    sweep = yaml.safe_load(sweep_file.read_text())
    sweep["grid"] = {LR_KEY: [1e-4, 1e-3]}
    if importlib.util.find_spec("lm_eval") is not None:  # ablate runs `eval` on each point's adapter after its fit
        sweep["eval"] = {"tasks": ["phi3lit_demo"], "limit": 2}
    sweep["fixed"] |= {"model.lora.r": 4, "model.lora.targets": ["q", "v"], "trainer.log_every_n_steps": 1}
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(sweep))
    proc = ablate(path, "--root", tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "lr"
    rows = list(csv.DictReader((out / "summary.csv").open()))
    for row, point in zip(rows, points(load_sweep(path)), strict=True):
        windows = [v for _, v in read_scalars(str(out / point["name"] / "tb"))["train/tokens_per_sec"]]
        assert len(windows) >= 3
        assert int(row["tokens_per_sec"]) == round(statistics.median(windows[1:]))  # start-up window left out
    assert "median of the point's logged `train/tokens_per_sec`" in (out / "summary.md").read_text()

    png = (out / "summary.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") < 1000  # one panel: both points train the same parameter count
    fig = summary_figure(load_sweep(path), rows)
    fig.canvas.draw()
    ticks = " ".join(t.get_text() for t in fig.axes[0].get_xticklabels())
    assert len(fig.axes) == 1 and "10^{-4}" in ticks and "10^{-3}" in ticks, ticks

    # The sweep's `eval:` scored each point's adapter into the point's TensorBoard; the summary has the score as a
    # column per run and its mean over seeds per point.
    if importlib.util.find_spec("lm_eval") is None:
        return
    stats = list(csv.DictReader((out / "summary_stats.csv").open()))
    for row, stat, point in zip(rows, stats, points(load_sweep(path)), strict=True):
        logged = read_scalars(str(out / point["name"] / "tb"))["eval/phi3lit_demo/exact_match"]
        assert float(row["eval_phi3lit_demo_exact_match"]) == pytest.approx(logged[-1][1], abs=1e-4)
        assert float(stat["eval_phi3lit_demo_exact_match_mean"]) == pytest.approx(logged[-1][1], abs=1e-4)
    over_seeds = (out / "summary.md").read_text().split("## Every run")[0]
    assert "| eval_phi3lit_demo_exact_match |" in over_seeds  # the score beside the losses, with its spread


def test_alpha_rules_become_each_points_alpha(tmp_path):
    sweep = {
        "base": TINY_BASE, "root": str(tmp_path),
        "grid": {"model.lora.r": [4, 16], "model.lora.alpha": [32, "2r", "rslora:16", "rslora"]},
    }  # fmt: skip
    path = tmp_path / "alpha.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))  # r first: the point names follow the grid's order
    proc = ablate(path, "--dry_run", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    commands = {
        line.split()[2]: shlex.split(command)
        for line, command in zip(*[iter(proc.stdout.strip().splitlines())] * 2, strict=True)
    }
    expected = {  # point name -> (alpha passed to fit or None, use_rslora passed, effective scale)
        "r=4__alpha=32": (32, False, 8.0), "r=4__alpha=2r": (8, False, 2.0),
        "r=4__alpha=rslora16": (16, True, 8.0), "r=4__alpha=rslora": (None, True, 32 / 2),
        "r=16__alpha=32": (32, False, 2.0), "r=16__alpha=2r": (32, False, 2.0),
        "r=16__alpha=rslora16": (16, True, 4.0), "r=16__alpha=rslora": (None, True, 32 / 4),
    }  # fmt: skip
    assert set(commands) == set(expected)
    for name, (alpha, rslora, scale) in expected.items():
        words = commands[name]
        given = words[words.index("--model.lora.alpha") + 1] if "--model.lora.alpha" in words else None
        assert given == (None if alpha is None else str(alpha)), name
        assert ("--model.lora.use_rslora" in words) == rslora, name
        point = next(p for p in points(load_sweep(path)) if p["name"] == name)
        o = point["overrides"]
        r = o["model.lora.r"]
        got = effective_scale(r, o.get("model.lora.alpha", 32), o.get("model.lora.use_rslora", False))
        assert got == scale, name  # tiny.yaml has alpha 32


def test_a_point_taken_by_another_worker_is_skipped_not_run(sweep_file, tmp_path):
    spec = load_sweep(sweep_file)
    spec["root"] = str(tmp_path)
    folder = point_dir(spec, points(spec)[0])
    folder.mkdir(parents=True)
    with open(folder / ".ablate.lock", "w") as held:  # as a worker running that point holds it
        held.write("pid 4242 on node7\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (folder / "status.json").write_text('{"status": "running"}')
        proc = ablate(sweep_file, "--root", tmp_path, "--index", 0)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"{folder.name}: running in another process (pid 4242 on node7), skipped" in proc.stdout
        assert "0 ok, 0 failed of 1 (1 running in another process, skipped)" in proc.stdout
        assert not (folder / "fit.log").exists() and not (folder / "checkpoints").exists()
        assert ablate(sweep_file, "--root", tmp_path, "--list", "true").stdout.splitlines()[0].endswith("\trunning")
    # The holder died without finishing: the lock is gone, the status still says running.
    assert ablate(sweep_file, "--root", tmp_path, "--list", "true").stdout.splitlines()[0].endswith("\tinterrupted")


def test_a_fit_stopped_by_a_signal_is_not_marked_done(sweep_file, tmp_path):
    """Preemption (SIGTERM) makes fit save last.ckpt and exit 0: the point must stay unfinished, and resume."""
    cmd = [sys.executable, "-m", "phi3lit", "ablate", str(sweep_file), "--root", str(tmp_path), "--index", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    point = tmp_path / "mini" / points(load_sweep(sweep_file))[0]["name"]
    deadline = time.monotonic() + 300
    while not (point / "checkpoints" / "step=000002.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    fit_pid = int((point / ".phi3lit.lock").read_text().split()[1])  # fit's own run-folder lock names its pid
    os.kill(fit_pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "stopped by a signal before its last step" in out, out[-2000:]
    assert "(1 stopped by a signal, to resume)" in out
    assert '"status": "stopped"' in (point / "status.json").read_text()
    rerun = ablate(sweep_file, "--root", tmp_path, "--index", 0)
    assert rerun.returncode == 0 and "resuming" in rerun.stdout and ": ok  " in rerun.stdout, rerun.stdout[-2000:]
