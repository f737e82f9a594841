"""GPU readiness: phi3lit's training step on the real Phi-3-mini shape, one short script (< 8 min on an H200).

    python experiments/bench/gpu.py            # on a CUDA GPU
    python experiments/bench/gpu.py --smoke    # the same code end to end on the CPU, shrunken shape
    python experiments/bench/gpu.py --out gpu.json --profile gpu_profile.md   # + the by-op table (issue 30)

Random-init Phi-3-mini (3.8 B, hidden 3072, 32 layers), bf16 base, fp32 LoRA r=16 on all linear projections,
rows of 4096 tokens packed by phi3lit's collate from conversations of random lengths, half the positions trained,
through `Phi3LoRA.token_losses` (the step phi3lit trains with). For sdpa_docs (and flash_attention_2 with varlen
offsets when flash-attn is installed) x gradient checkpointing on/off x chunked cross-entropy on/off, plus sdpa
with transformers' dense mask as a reference and phi3lit's FSDP2 sharding on one device (its wrappers' cost),
it reports tokens/s, MFU against 989 TFLOP/s (H100/H200 dense bf16) and against a bf16 matmul peak measured here,
and peak CUDA memory. Target: >= 25,000 tokens/s and
<= 30 GB without checkpointing. MFU counts phi3lit.run.monitor.model_flops: 4 x frozen + 6 x trainable FLOPs per
token, the LM head at trained positions, attention within each conversation.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch

from phi3lit.data import collate
from phi3lit.model.fused_lora import fuse_lora_layers
from phi3lit.model.lora import LoraSpec, apply_lora, shard_fsdp2
from phi3lit.model.module import Phi3LoRA
from phi3lit.run.monitor import measure_matmul_flops, model_flops

SPEC_PEAK = 989e12
REAL = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, sliding_window=2047)  # fmt: skip
SMOKE = dict(REAL, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512, sliding_window=511)  # fmt: skip


def packed_batch(rows: int, length: int, vocab: int, generator) -> dict:
    """Rows of conversations of random lengths, half their positions trained, through phi3lit's own collate."""
    convs = []
    for _ in range(rows):
        row, t = [], 0
        while t < length:
            n = min(int(torch.randint(length // 8, length // 2, (1,), generator=generator)), length - t)
            ids = torch.randint(3, vocab, (n,), generator=generator)
            labels = torch.where(torch.rand(n, generator=generator) < 0.5, -100, ids)
            row.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
            t += n
        convs.append(row)
    return collate(convs, pad_id=0)


def run(
    shape: dict,
    attn: str,
    checkpointing: bool,
    ce_chunk: int,
    rows: int,
    steps: int,
    device,
    fsdp2: bool = False,
    fused: bool = True,
    profiler=None,
) -> dict:
    """Phi3LoRA.token_losses (the training step phi3lit runs) on a random-init model built on the device.

    LoRA dropout 0.05 as in the recipes, through phi3lit's fused LoRA layers (`fused=False`: peft's forward). With
    a `profiler`, the timed steps run inside it (and are slower for it).
    """
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(**shape, pad_token_id=0, attn_implementation=attn)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        base = Phi3ForCausalLM(config).to(dtype)
    if checkpointing:
        base.gradient_checkpointing_enable({"use_reentrant": False})
    module = Phi3LoRA(attn_implementation=attn, ce_chunk=ce_chunk)
    module.model = apply_lora(base, LoraSpec(r=16, alpha=32, dropout=0.05, targets=["all-linear"])).train()
    if fused:  # as Phi3LoRA.configure_model does with model.fused_lora (the default)
        fuse_lora_layers(module.model)
    if fsdp2:  # phi3lit's FSDP2 sharding (configure_model under configs/strategy/fsdp2.yaml), over this one device
        from torch.distributed.device_mesh import init_device_mesh

        shard_fsdp2(module.model, init_device_mesh(device.type, (1,)))
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    length = shape["max_position_embeddings"]
    batches = [packed_batch(rows, length, shape["vocab_size"], g) for _ in range(2)]
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup, t0, ctx, trained = 2, None, 0, 0
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
            if profiler is not None:
                profiler.start()
        batch = batches[i % 2]
        loss_sum, n, _ = module.token_losses(batch)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            ctx += int((batch["position_ids"] + 1).sum())
            trained += int(n)
    sync()
    seconds = time.perf_counter() - t0
    if profiler is not None:
        profiler.stop()
    tokens = steps * rows * length
    per_token, per_trained, per_ctx = model_flops(module)
    flops = per_token * tokens + per_trained * trained + per_ctx * ctx
    peak_mem = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    del module, base, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"attn": attn, "checkpointing": checkpointing, "ce_chunk": ce_chunk, "fsdp2": fsdp2, "fused": fused,
            "tokens_per_sec": tokens / seconds,
            "tflops": flops / seconds / 1e12, "peak_memory_gb": peak_mem}  # fmt: skip


def write_profile(shape: dict, rows: int, steps: int, device, out: str) -> None:
    """The by-op breakdown of profile_ops.py for the default configuration: self device time on a GPU."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from profile_ops import table

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    run(shape, "sdpa_docs", False, 4096, rows, steps, device, profiler=profiler)
    command = " ".join(["python experiments/bench/gpu.py", *sys.argv[1:]])
    text = f"# phi3lit training step by op ({device.type})\n\n    {command}\n\n"
    text += table(profiler.key_averages(), steps, top=20, device=device.type == "cuda")
    Path(out).write_text(text)
    print(text, flush=True)


def _init_single_process_group(device) -> None:
    """A one-process group (FSDP2 needs one even on a single device)."""
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="shrunken shape on the CPU, to check the script runs")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--rows", type=int, default=None, help="packed rows per step")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--profile", default=None, help="also profile the default configuration: by-op table (.md)")
    args = parser.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    shape = SMOKE if smoke else REAL
    steps, rows = args.steps or (1 if smoke else 4), args.rows or (1 if smoke else 2)
    dtype = torch.float32 if smoke else torch.bfloat16
    peak = measure_matmul_flops(device, dtype, n=1024 if smoke else 8192)
    print(f"device {device}, measured {dtype} matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    attns = ["sdpa_docs"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") and not smoke else [])
    configs = [(attn, gc, ce, False, True) for attn in attns for gc in (False, True) for ce in (0, 4096)]
    configs.append(("sdpa", False, 0, False, True))  # reference: transformers' dense block-diagonal mask
    configs.append(("sdpa_docs", False, 4096, False, False))  # reference: peft's own LoRA forward
    # FSDP2 on one device: the cost of phi3lit's sharding wrappers (gather/free per layer) on the step; with several
    # GPUs, torchrun this script's FSDP2 case or fit with configs/strategy/fsdp2.yaml.
    configs.append(("sdpa_docs", True, 4096, True, True))
    _init_single_process_group(device)
    results = []
    if args.profile:  # first, so its table describes the same configuration as the first row
        write_profile(shape, rows, steps, device, args.profile)
    for attn, checkpointing, ce_chunk, fsdp2, fused in configs:
        r = run(shape, attn, checkpointing, ce_chunk, rows, steps, device, fsdp2, fused)
        r["mfu_spec"] = r["tflops"] * 1e12 / SPEC_PEAK
        r["mfu_measured"] = r["tflops"] * 1e12 / peak
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "matmul_peak_tflops": peak / 1e12, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
