"""Shared fixtures. Tests never touch the network: hub access is switched off before anything imports it."""

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REAL_TOKENIZER = SHARED / "phi3-tokenizer"
SHARED_DATA = SHARED / "data"

needs_real_tokenizer = pytest.mark.skipif(not REAL_TOKENIZER.is_dir(), reason="../shared/phi3-tokenizer is absent")
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from phi3lit.tiny import TINY_NAME, resolve_pretrained

    return resolve_pretrained(TINY_NAME)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def real_tokenizer():
    if not REAL_TOKENIZER.is_dir():
        pytest.skip("../shared/phi3-tokenizer is absent")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REAL_TOKENIZER)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """The README's main job, exactly as a user runs it."""
    out = tmp_path_factory.mktemp("tiny")
    config = str(ROOT / "configs" / "tiny.yaml")
    cmd = [sys.executable, "-m", "phi3lit", "fit", "--config", config, "--trainer.default_root_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable params: 114,688" in proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 60 shipped tiny chats: a few packed batches, so a CLI fit of a few steps takes seconds."""
    from phi3lit.tiny import TINY_DATA

    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[:60]))
    return path
