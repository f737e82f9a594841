"""The benchmarks run end to end for a few steps (no speed thresholds: timing belongs in the benchmark)."""

import json
import subprocess
import sys

from helpers import ROOT


def test_side_by_side_benchmark_runs(tmp_path):
    cmd = [sys.executable, "experiments/bench/run.py", "--steps", "1", "--warmup", "1", "--only", "phi3lit"]
    cmd += ["--length", "256", "--environment", "users"]  # one child: the other environment only sets malloc vars
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 1 and all(r["tokens_per_sec"] > 0 and r["peak_rss_gb"] > 0 for r in results)
    table = (tmp_path / "results.md").read_text()
    assert "| phi3lit |" in table and "--length 256 --environment users" in table


def test_gpu_script_smoke_runs_on_cpu(tmp_path):
    out, profile = tmp_path / "gpu.json", tmp_path / "profile.md"
    cmd = [sys.executable, "experiments/bench/gpu.py", "--smoke", "--out", str(out), "--profile", str(profile)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert len(results) == 7 and all(r["tokens_per_sec"] > 0 for r in results)
    assert {r["attn"] for r in results} == {"sdpa_docs", "sdpa"} and [r["fsdp2"] for r in results].count(True) == 1
    assert [r["fused"] for r in results].count(False) == 1  # peft's own LoRA forward, as the reference
    table = profile.read_text()
    assert "self CPU time" in table and "| matmul |" in table and "`aten::mm`" in table


def test_levers_script_runs(tmp_path):
    out = tmp_path / "levers.md"
    cmd = [sys.executable, "experiments/bench/levers.py", "--repeat", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "ms" not in line]
    assert len(rows) == 4 and all(line.endswith("x |") for line in rows)
