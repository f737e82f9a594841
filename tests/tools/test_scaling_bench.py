"""The scaling benchmark runs end to end on one point (no speed thresholds)."""

import json
import subprocess
import sys

from helpers import ROOT


def test_scaling_benchmark_runs(tmp_path):
    cmd = [sys.executable, "experiments/bench/scaling.py", "--steps", "1", "--warmup", "1"]
    # One point (the rank sweep runs the same code at another rank): each point is a fresh process, ~15 s here.
    cmd += ["--lengths", "512", "--ranks", "--tokens_per_step", "1024", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "scaling.json").read_text())
    assert [(r["sweep"], r["seq_len"], r["rank"]) for r in results] == [("seq_len", 512, 16)]
    assert all(r["tokens_per_sec"] > 0 and r["peak_rss_gb"] > 0 and r["timed_steps"] == 1 for r in results)
    assert [r["rows_per_step"] for r in results] == [2]  # 1024 token slots per step
    assert all(r["docs_per_row"] >= 1 for r in results)
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 512 |" in (tmp_path / "scaling.md").read_text()
