"""Tokenization speed and the cache: `python experiments/bench/tokenize_speed.py` (needs ../shared/)."""

import tempfile
import time
from pathlib import Path

import datasets

from phi3lit.data import ChatDataModule

SHARED = Path(__file__).resolve().parents[3] / "shared"

if __name__ == "__main__":
    datasets.disable_progress_bars()
    for name in ["oasst_en_100_all_paths.jsonl", "dpo_en_demo_chosen.jsonl", "dpo_en_demo_chosen.sharegpt.json"]:
        cache, times = tempfile.mkdtemp(), []
        for _ in range(2):  # the first run tokenizes, the second reads the cache
            dm = ChatDataModule(str(SHARED / "data" / name), val_fraction=0, tokenizer=str(SHARED / "phi3-tokenizer"),
                                max_length=4096, cache_dir=cache)  # fmt: skip
            start = time.perf_counter()
            dm.setup("fit")
            times.append(time.perf_counter() - start)
        n = sum(dm.tokenized["train"]["full_length"])
        print(f"{name}: {n:,} tokens, first {times[0]:.2f}s ({n / times[0]:,.0f} tok/s), cached {times[1]:.2f}s")
