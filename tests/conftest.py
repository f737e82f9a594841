"""Shared fixtures. Tests never touch the network: hub access is switched off before anything imports it."""

import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from helpers import REAL_TOKENIZER, ROOT  # noqa: E402


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
