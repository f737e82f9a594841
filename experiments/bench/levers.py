"""Issue 30's levers one at a time, each against what it replaced, on the bench's shapes (CPU, fp32).

    python experiments/bench/levers.py            # prints a markdown table; --out FILE also writes it

- loss: one 1024 x 32,064 chunk of the fused LM-head loss (forward and dloss/dh), before (`torch.logsumexp`,
  then the softmax in place, argmax for the hits) and now (`phi3lit.model.loss`).
- dropout mask: F.dropout on a 4096 x 384 input, against `keep_mask` and the masked copy the fused layer makes.
- attention: one 512-token conversation (6 heads of 64), SDPA forward and backward with 3-D slices (the math
  path) and 4-D ones (the CPU flash kernel).
- LoRA layer: qkv_proj of the bench model (384 -> 1152, r=16, dropout 0.05) on 4096 tokens, forward and backward,
  peft's forward against `FusedLoraLinear`.

Best of `--repeat` timings after one warm-up; run it with the allocator setting the CLI uses (it sets it itself).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def best_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def loss_before(h, weight, t):
    """phi3lit.model.loss's chunk body at commit 3ffd042 (frozen head: loss, hits, dloss/dh)."""
    logits = (h @ weight.T).float()
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, t[:, None]).squeeze(1)
    loss = (lse - picked).sum()
    hits = (logits.argmax(-1) == t).sum()
    grad = logits.sub_(lse[:, None]).exp_()
    grad[torch.arange(len(t)), t] -= 1
    return loss, hits, grad @ weight


def lever_loss(repeat: int) -> tuple[float, float]:
    from phi3lit.model.loss import chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(384, 32064, bias=False).requires_grad_(False)
    h = torch.randn(1024, 384, generator=g, requires_grad=True)
    t = torch.randint(0, 32064, (1024,), generator=g)

    def now():
        loss, _ = chunked_cross_entropy(h, head, t, chunk=1024)
        loss.backward()

    return best_ms(lambda: loss_before(h.detach(), head.weight, t), repeat), best_ms(now, repeat)


def lever_mask(repeat: int) -> tuple[float, float]:
    from phi3lit.model.fused_lora import keep_mask

    x = torch.randn(4096, 384)
    now = lambda: x * keep_mask(x.shape, 0.05, x.device)  # noqa: E731 (the fused layer scales on the rank-r side)
    return best_ms(lambda: F.dropout(x, 0.05, training=True), repeat), best_ms(now, repeat)


def lever_attention(repeat: int) -> tuple[float, float]:
    q, k, v = (torch.randn(1, 6, 512, 64, requires_grad=True) for _ in range(3))

    def step(four_d: bool):
        args = (q, k, v) if four_d else (q[0], k[0], v[0])
        F.scaled_dot_product_attention(*args, is_causal=True).sum().backward()

    return best_ms(lambda: step(False), repeat), best_ms(lambda: step(True), repeat)


def lever_lora(repeat: int) -> tuple[float, float]:
    from peft import LoraConfig, get_peft_model

    from phi3lit.model.fused_lora import fuse_lora_layers

    def layer(fused: bool):
        torch.manual_seed(0)
        model = get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(384, 1152, bias=False)),
            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["0"]),
        )
        if fused:
            fuse_lora_layers(model)
        return model.train()

    x = torch.randn(4096, 384, requires_grad=True)
    stock, fused = layer(False), layer(True)
    return best_ms(lambda: stock(x).sum().backward(), repeat), best_ms(lambda: fused(x).sum().backward(), repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from phi3lit.run.allocator import keep_freed_memory

    keep_freed_memory()  # as the CLI does
    levers = [
        ("loss chunk 1024 x 32,064 (fwd + dloss/dh)", lever_loss),
        ("dropout mask + masked copy, 4096 x 384", lever_mask),
        ("attention, one 512-token conversation (fwd + bwd)", lever_attention),
        ("LoRA qkv_proj 384 -> 1152, 4096 tokens (fwd + bwd)", lever_lora),
    ]
    lines = [f"`python experiments/bench/levers.py --repeat {args.repeat}`, {torch.get_num_threads()} threads", ""]
    lines += ["| lever | before (ms) | now (ms) | speed-up |", "|---|---:|---:|---:|"]
    for name, fn in levers:
        before, now = fn(args.repeat)
        lines.append(f"| {name} | {before:.1f} | {now:.1f} | {before / now:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
