"""Pretraining `builtin:tiny-phi3` on the lab's world: a plain next-token loop, all weights trained.

This is the offline stand-in for Phi-3's own pretraining, so it is deliberately not phi3lit's LoRA pipeline: every
weight trains, documents are concatenated and cut into fixed rows with `<|endoftext|>` between them (GPT-style,
attention crosses document boundaries as in most pretraining), and there is no validation. It runs once per
machine (the result is cached like every built-in model) in a few minutes on two CPU cores.

Deterministic: the same seed gives the same weights, bit for bit, on the same machine and thread count (a test
builds twice through the CLI and compares the files).
"""

from __future__ import annotations

import math
import random
import sys
import time

from phi3lit.tiny.world import make_world, pretraining_documents

STEPS = 600  # measured on 2 cores: the held-out facts are all recalled, and LoRA then reaches >= 0.8 on the demo
ROWS, ROW_TOKENS = 32, 128  # 4,096 tokens a step; short rows because every document is short
LR, WARMUP, FINAL_LR_RATIO = 3e-3, 50, 0.05  # a toy model from scratch takes a large step, cooled at the end


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to FINAL_LR_RATIO: the cool-down is what makes the facts stick."""
    warm = min(1.0, (step + 1) / WARMUP)
    return warm * (FINAL_LR_RATIO + (1 - FINAL_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def pretrain_world(
    model, tokenizer, chats: list[str], steps: int = STEPS, seed: int = 0, log_every: int = 100
) -> float:
    """Train every weight of `model` on the world for `steps` steps; returns the last loss."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    documents = pretraining_documents(make_world(seed), chats, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    model.train()
    stream: list[int] = []
    loss = torch.tensor(float("nan"))
    start = time.monotonic()
    for step in range(steps):
        while len(stream) < ROWS * ROW_TOKENS:
            stream += tokenizer(next(documents)).input_ids + [tokenizer.eos_token_id]
        ids = torch.tensor(stream[: ROWS * ROW_TOKENS]).view(ROWS, ROW_TOKENS)
        del stream[: ROWS * ROW_TOKENS]  # the rest of a cut document starts the next step, as in a packed corpus
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            print(f"[phi3lit] pretraining the tiny base: step {step + 1}/{steps}, loss {loss.item():.3f}, "
                  f"{time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    model.eval()
    return loss.item()
