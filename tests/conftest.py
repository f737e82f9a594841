"""Shared fixtures. Tests never touch the network: hub access is switched off before anything imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compute thread per test process (and the fits it starts): the suite runs on several workers (pytest-xdist),
# and two-thread torch processes sharing two cores spin against each other (measured: a 20-step tiny fit took 17 s
# instead of 6 s beside one other process). Tiny-model matmuls gain little from a second thread anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import logging  # noqa: E402

import lightning  # noqa: E402, F401
import pytest  # noqa: E402

# Lightning stops its loggers propagating when the root logger has no handler at import time, as in an xdist
# worker; then pytest's caplog (on the root logger) would see none of phi3lit's lines.
for _name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).propagate = True
from helpers import REAL_TOKENIZER, ROOT, run_main  # noqa: E402


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from phi3lit.hub import resolve_pretrained
    from phi3lit.tiny import TINY_NAME

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
    """The README's main job, with the user's command words: fitted once per test session, shared by the workers."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    out = base / "tiny-run"
    with open(base / "tiny-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker fits; the others wait and reuse the run
        if not (out / "adapter").is_dir():
            config = str(ROOT / "configs" / "tiny.yaml")
            output = run_main(["fit", "--config", config, "--trainer.default_root_dir", str(out)])
            assert "trainable params: 114,688" in output
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 60 shipped tiny chats: a few packed batches, so a CLI fit of a few steps takes seconds."""
    from phi3lit.tiny import TINY_DATA

    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[:60]))
    return path
