"""Side-by-side training throughput: phi3lit vs TRL's SFTTrainer + peft on the same work.

    pip install -e '.[bench]'
    python experiments/bench/run.py                 # both frameworks, both allocator settings
    python experiments/bench/run.py --steps 4 --warmup 1 --only phi3lit    # quick

Same tiny Phi-3 (hidden 384, 4 layers, 6 heads, intermediate 1024, vocabulary 32,064, seeded random init),
same chat data (../shared/data/dpo_en_demo_chosen.jsonl when present, else the shipped tiny chats), same LoRA
(r=16, alpha=32, dropout=0.05, all linear projections), fp32, 4 x 1024 tokens per optimizer step, TRL packing
`bfd`, gradient checkpointing off in both. Each framework runs in its own process; the first `--warmup` steps
are not timed. Reported: real (non-padding) tokens/s, peak RSS, MFU against a matmul peak measured on the spot.
Writes results.json and results.md beside this file (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
SHAPE = dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6,
             intermediate_size=1024, vocab_size=32064, max_position_embeddings=4096, sliding_window=None)  # fmt: skip
ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
ROWS, LENGTH = 4, 1024


def tokenizer_path() -> str:
    real = SHARED / "phi3-tokenizer"
    return str(real) if real.is_dir() else str(ROOT / "phi3lit" / "assets" / "tiny-tokenizer")


def data_path() -> str:
    real = SHARED / "data" / "dpo_en_demo_chosen.jsonl"
    return str(real) if real.is_file() else str(ROOT / "phi3lit" / "assets" / "tiny_chat.jsonl")


def build_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    model = Phi3ForCausalLM(Phi3Config(**SHAPE, pad_token_id=0, bos_token_id=1, eos_token_id=tok.eos_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def flops_per_token(model, trainable: int) -> float:
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return 4 * (total - trainable - embed) + 6 * trainable  # + attention, added per step from the positions


class Clock:
    """Tokens and seconds after warm-up; attention FLOPs from the attended positions."""

    def __init__(self, warmup: int, hidden: int, layers: int):
        self.warmup, self.step, self.t0 = warmup, 0, None
        self.tokens = self.attn_ctx = 0
        self.attn_per_ctx = 12 * layers * hidden

    def batch(self, tokens: int, ctx: int) -> None:
        if self.step >= self.warmup:
            self.tokens += tokens
            self.attn_ctx += ctx

    def step_end(self) -> None:
        self.step += 1
        if self.step == self.warmup:
            self.t0 = time.perf_counter()

    def result(self, per_token: float, peak: float, name: str) -> dict:
        seconds = time.perf_counter() - self.t0
        flops = per_token * self.tokens + self.attn_per_ctx * self.attn_ctx
        return {
            "framework": name, "tokens_per_sec": self.tokens / seconds, "timed_steps": self.step - self.warmup,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "mfu": flops / seconds / peak, "matmul_peak_gflops": peak / 1e9,
        }  # fmt: skip


def lora_config(task_type: str | None = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type=task_type,
                      target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])  # fmt: skip


# ---------------------------------------------------------------------------- phi3lit
def run_phi3lit(model_dir: str, steps: int, warmup: int, peak: float) -> dict:
    import lightning as L

    from phi3lit.data import ChatDataModule
    from phi3lit.lora import LoraSpec
    from phi3lit.model import Phi3LoRA

    clock = Clock(warmup, SHAPE["hidden_size"], SHAPE["num_hidden_layers"])

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            real = batch.get("real_tokens")
            real = int(real) if real is not None else int((batch["input_ids"] != 0).sum())  # pad id 0 is <unk>
            clock.batch(real, int((batch["position_ids"] + 1).sum()))
            clock.step_end()

    L.seed_everything(0)
    module = Phi3LoRA(pretrained=model_dir, lora=LoraSpec(r=16, alpha=32, dropout=0.05), max_length=LENGTH)
    dm = ChatDataModule(data_path(), val_fraction=0.0, tokenizer=model_dir, max_length=LENGTH, batch_size=ROWS)
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=steps + warmup, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Timer()], num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, dm)
    per_token = flops_per_token(module.model, module.param_counts()[0])
    return clock.result(per_token, peak, "phi3lit")


# ---------------------------------------------------------------------------- TRL
def run_trl(model_dir: str, steps: int, warmup: int, peak: float, packing: str, checkpointing: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    clock = Clock(warmup, SHAPE["hidden_size"], SHAPE["num_hidden_layers"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in Path(data_path()).read_text().splitlines() if line.strip()]
    dataset = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            ids = inputs["input_ids"]
            real = int(mask.sum()) if mask is not None else int(ids.numel())
            pos = inputs.get("position_ids")
            ctx = int((pos + 1).sum()) if pos is not None else real * LENGTH // 2
            clock.batch(real, ctx)
            return super().training_step(model, inputs, num_items_in_batch)

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_end()

    config = SFTConfig(
        output_dir=str(Path(model_dir).parent / "trl-out"), max_length=LENGTH, packing=True,
        packing_strategy=packing, per_device_train_batch_size=ROWS, gradient_accumulation_steps=1,
        gradient_checkpointing=checkpointing, max_steps=steps + warmup, learning_rate=2e-4, logging_steps=1000,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = Counting(model=model, args=config, train_dataset=dataset, processing_class=tok,
                       peft_config=lora_config(), callbacks=[Steps()])  # fmt: skip
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    name = f"trl ({packing}{', checkpointing' if checkpointing else ''})"
    return clock.result(flops_per_token(trainer.model, trainable), peak, name)


# ---------------------------------------------------------------------------- driver
def child(args) -> None:
    import torch

    from phi3lit.callbacks import measure_matmul_flops

    torch.manual_seed(0)
    peak = measure_matmul_flops(torch.device("cpu"), torch.float32)
    if args.child == "phi3lit":
        result = run_phi3lit(args.model, args.steps, args.warmup, peak)
    else:
        packing, gc = args.child.split(":")[1], args.child.endswith(":gc")
        result = run_trl(args.model, args.steps, args.warmup, peak, packing.replace("-gc", ""), gc)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--only", choices=["phi3lit", "trl"], help="run one framework")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder for results.json / results.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    model_dir = build_model(Path(os.environ.get("PHI3LIT_CACHE", Path.home() / ".cache" / "phi3lit")) / "bench-phi3")
    runs = []  # (environment name, extra env, child)
    for env_name, env in (("as users run it", {}), ("allocator kept (MALLOC_MMAP_MAX_=0, TRIM=64G)", ALLOCATOR)):
        if args.only != "trl":
            runs.append((env_name, env, "phi3lit"))
        if args.only != "phi3lit":
            runs.append((env_name, env, "trl:bfd"))
    if args.only != "phi3lit":
        runs.append(("as users run it", {}, "trl:bfd:gc"))  # TRL's defaults turn checkpointing on
        runs.append(("allocator kept (MALLOC_MMAP_MAX_=0, TRIM=64G)", ALLOCATOR, "trl:wrapped"))  # reference only
    results = []
    for env_name, env, who in runs:
        cmd = [sys.executable, __file__, "--child", who, "--model", str(model_dir),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{who} ({env_name}) failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        result = json.loads(line[-1][len("RESULT ") :]) | {"environment": env_name}
        print(json.dumps(result), flush=True)
        results.append(result)
    write(results, Path(args.out), args)


def write(results: list[dict], out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"`python experiments/bench/run.py --steps {args.steps} --warmup {args.warmup}`, "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, torch threads default",
        "",
        "| environment | framework | real tokens/s | peak RSS (GB) | MFU | matmul peak (GFLOP/s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['environment']} | {r['framework']} | {r['tokens_per_sec']:.0f} | {r['peak_rss_gb']:.2f} | "
            f"{r['mfu']:.1%} | {r['matmul_peak_gflops']:.0f} |"
        )
    ours = {r["environment"]: r for r in results if r["framework"] == "phi3lit"}
    for r in results:
        if r["framework"] != "phi3lit" and r["environment"] in ours:
            mine = ours[r["environment"]]
            speed = mine["tokens_per_sec"] / r["tokens_per_sec"]
            memory = mine["peak_rss_gb"] / r["peak_rss_gb"]
            lines.append(f"\nphi3lit / {r['framework']} ({r['environment']}): {speed:.2f}x tokens/s, {memory:.2f}x RSS")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
