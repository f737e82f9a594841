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
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
SHAPE = dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6,
             intermediate_size=1024, vocab_size=32064, max_position_embeddings=4096, sliding_window=None)  # fmt: skip
ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
ROWS, LENGTH = 4, 1024  # rows x tokens per optimizer step (--length changes the row length)


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
    stage = out.with_name(f"{out.name}.tmp-{os.getpid()}")  # published by rename: two benches may build at once
    model.save_pretrained(stage)
    tok.save_pretrained(stage)
    try:
        stage.rename(out)
    except OSError:  # another process published it first
        shutil.rmtree(stage, ignore_errors=True)
    return out


def step_flops(model, trainable: int) -> tuple[int, int]:
    """(per token, per loss position): frozen matmuls 4N, trained 6N; the LM head only where a loss is taken."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    return 4 * (total - trainable - embed - head) + 6 * trainable, 4 * head  # + attention, from the positions


class Clock:
    """Tokens and seconds after warm-up; attention FLOPs from the attended positions of each document."""

    def __init__(self, warmup: int, hidden: int, layers: int):
        self.warmup, self.step, self.t0 = warmup, 0, None
        self.tokens = self.attn_ctx = self.loss_positions = 0
        self.attn_per_ctx = 12 * layers * hidden

    def batch(self, tokens: int, ctx: int, loss_positions: int) -> None:
        if self.step >= self.warmup:
            self.tokens += tokens
            self.attn_ctx += ctx
            self.loss_positions += loss_positions

    def step_end(self) -> None:
        self.step += 1
        if self.step == self.warmup:
            self.t0 = time.perf_counter()

    def result(self, flops: tuple[int, int], peak: float, name: str) -> dict:
        seconds = time.perf_counter() - self.t0
        per_token, per_loss = flops
        total = per_token * self.tokens + per_loss * self.loss_positions + self.attn_per_ctx * self.attn_ctx
        return {
            "framework": name, "tokens_per_sec": self.tokens / seconds, "timed_steps": self.step - self.warmup,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "mfu": total / seconds / peak, "matmul_peak_gflops": peak / 1e9,
            "loss_positions_share": self.loss_positions / max(1, self.tokens),
        }  # fmt: skip


def lora_config(task_type: str | None = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type=task_type,
                      target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])  # fmt: skip


# ---------------------------------------------------------------------------- phi3lit
def run_phi3lit(model_dir: str, steps: int, warmup: int, peak: float, options: dict, length: int = LENGTH) -> dict:
    """phi3lit as its CLI runs it (allocator kept unless `allocator: system`); `options` change one default."""
    import lightning as L

    from phi3lit.data import IGNORE_INDEX, ChatDataModule
    from phi3lit.model.lora import LoraSpec
    from phi3lit.model.module import Phi3LoRA
    from phi3lit.run.allocator import keep_freed_memory

    options = dict(options)
    if options.pop("allocator", "keep") == "keep":
        keep_freed_memory()
    clock = Clock(warmup, SHAPE["hidden_size"], SHAPE["num_hidden_layers"])

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            clock.batch(int(batch["real_tokens"]), int((batch["position_ids"] + 1).sum()), trained)
            clock.step_end()

    L.seed_everything(0)
    lora = LoraSpec(r=16, alpha=32, dropout=options.pop("dropout", 0.05))
    data_options = {k: options.pop(k) for k in ("num_workers", "train_on") if k in options}
    module = Phi3LoRA(pretrained=model_dir, lora=lora, **options)
    dm = ChatDataModule(data_path(), val_fraction=0.0, tokenizer=model_dir, max_length=length, batch_size=ROWS,
                        **data_options)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=steps + warmup, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Timer()], num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, dm)
    return clock.result(step_flops(module.model, module.param_counts()[0]), peak, "phi3lit")


# ---------------------------------------------------------------------------- TRL
def run_trl(
    model_dir: str, steps: int, warmup: int, peak: float, packing: str, checkpointing: bool, length: int = LENGTH
) -> dict:
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
            if pos is not None:  # packed: positions restart per document
                ctx = int((pos + 1).sum())
            else:  # padded rows, one conversation each: L (L + 1) / 2 attended positions
                lengths = mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
                ctx = int((lengths * (lengths + 1) // 2).sum())
            labels = inputs.get("labels")  # TRL's loss covers every token of a messages dataset
            clock.batch(real, ctx, int((labels[:, 1:] != -100).sum()) if labels is not None else real)
            return super().training_step(model, inputs, num_items_in_batch)

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_end()

    config = SFTConfig(
        output_dir=str(Path(model_dir).parent / "trl-out"), max_length=length, packing=packing != "none",
        packing_strategy=packing if packing != "none" else "bfd", per_device_train_batch_size=ROWS,
        gradient_accumulation_steps=1,
        gradient_checkpointing=checkpointing, max_steps=steps + warmup, learning_rate=2e-4, logging_steps=1000,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = Counting(model=model, args=config, train_dataset=dataset, processing_class=tok,
                       peft_config=lora_config(), callbacks=[Steps()])  # fmt: skip
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    name = f"trl ({'no packing' if packing == 'none' else packing}{', checkpointing' if checkpointing else ''})"
    return clock.result(step_flops(trainer.model, trainable), peak, name)


# ---------------------------------------------------------------------------- driver
USERS, KEPT = "as users run it", "allocator kept (MALLOC_MMAP_MAX_=0, TRIM=64G)"
VARIANTS = [  # one phi3lit default changed at a time: what each switch is worth
    {"attn_implementation": "sdpa"},  # transformers' dense block-diagonal mask instead of per-document SDPA
    {"allocator": "system"},  # no mallopt at start-up
    {"gradient_checkpointing": True},
    {"compile": True},
    {"dropout": 0.0},  # peft uses nn.Identity: no dropout copy of the input
    {"num_workers": 1},
    {"ce_chunk": 0},  # all logits at once through autograd, instead of the fused chunked loss
    {"train_on": "all"},  # loss on every token, as TRL computes it for a messages dataset
]


def child(args) -> None:
    import torch

    from phi3lit.run.monitor import measure_matmul_flops

    torch.manual_seed(0)
    peak = measure_matmul_flops(torch.device("cpu"), torch.float32)
    if args.child == "phi3lit":
        result = run_phi3lit(args.model, args.steps, args.warmup, peak, json.loads(args.options), args.length)
    else:
        packing, gc = args.child.split(":")[1], args.child.endswith(":gc")
        result = run_trl(args.model, args.steps, args.warmup, peak, packing, gc, args.length)
    print("RESULT " + json.dumps(result), flush=True)


def plan(
    only: str | None, variants: bool, options: dict, environment: str | None = None
) -> list[tuple[str, str, dict, str, dict]]:
    """(table, environment, extra env, child, phi3lit options) for every process to run."""
    if options:  # one switched option against the defaults
        return [("phi3lit options", USERS, {}, "phi3lit", o) for o in ({}, options)]
    runs = []
    environments = {"users": (USERS, {}), "kept": (KEPT, ALLOCATOR)}
    for env_name, env in [v for k, v in environments.items() if environment in (None, k)]:
        if only != "trl":
            runs.append(("side by side", env_name, env, "phi3lit", {}))
        if only != "phi3lit":
            runs.append(("side by side", env_name, env, "trl:bfd", {}))
    if only != "phi3lit":
        runs.append(("side by side", USERS, {}, "trl:bfd:gc", {}))  # TRL's defaults turn checkpointing on
        runs.append(("side by side", USERS, {}, "trl:none", {}))  # TRL's default: no packing, padded rows
        runs.append(("side by side", KEPT, ALLOCATOR, "trl:wrapped", {}))  # reference only: no isolation
    if variants and only != "trl":
        runs += [("phi3lit options", USERS, {}, "phi3lit", v) for v in VARIANTS]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--only", choices=["phi3lit", "trl"], help="run one framework")
    parser.add_argument("--variants", action="store_true", help="also phi3lit with each option switched")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; the median is reported")
    parser.add_argument("--length", type=int, default=LENGTH, help="tokens per packed row (4 rows per step)")
    parser.add_argument("--environment", choices=["users", "kept"], help="run one environment (default: both)")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder for results.json / results.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help="JSON of one phi3lit option to compare with its default")
    args = parser.parse_args()
    if args.child:
        return child(args)
    model_dir = build_model(Path(os.environ.get("PHI3LIT_CACHE", Path.home() / ".cache" / "phi3lit")) / "bench-phi3")
    runs = plan(args.only, args.variants, json.loads(args.options), args.environment)
    measured: dict[int, list[dict]] = {i: [] for i in range(len(runs))}
    for _ in range(args.repeat):  # repeats interleave (A B C A B C), so slow drifts of the machine hit all alike
        for i, (_table, env_name, env, who, options) in enumerate(runs):
            cmd = [sys.executable, __file__, "--child", who, "--model", str(model_dir), "--options",
                   json.dumps(options), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--length", str(args.length)]  # fmt: skip
            proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{who} {options} ({env_name}) failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(line[-1][len("RESULT ") :])
            print(json.dumps(result | {"environment": env_name, "options": options}), flush=True)
            measured[i].append(result)
    results = []
    for i, (table, env_name, _env, _who, options) in enumerate(runs):
        if measured[i]:
            result = median_of(measured[i]) | {"environment": env_name, "table": table}
            if options:
                result["framework"] += " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
            results.append(result)
    write(results, Path(args.out), args)


def median_of(runs: list[dict]) -> dict:
    """The run with the median tokens/s (its RSS and MFU come with it), plus the spread over all runs."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_sec"])
    spread = [r["tokens_per_sec"] for r in runs]
    return ranked[(len(ranked) - 1) // 2] | {"runs": len(runs), "tokens_per_sec_all": spread}


def write(results: list[dict], out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    flags = f" --only {args.only}" if args.only else ""
    flags += " --variants" if args.variants else ""
    flags += f" --repeat {args.repeat}" if args.repeat > 1 else ""
    flags += f" --length {args.length}" if args.length != LENGTH else ""
    flags += f" --environment {args.environment}" if args.environment else ""
    flags += f" --options '{args.options}'" if args.options != "{}" else ""
    lines = [
        f"`python experiments/bench/run.py --steps {args.steps} --warmup {args.warmup}{flags}`, "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, torch threads default",
    ]
    # Each process measures the matmul peak for 0.75 s at its start; on a shared VM that reading moves by +-10%, so
    # every row's MFU is taken against the highest peak of the run (one roof for all rows, and the lower MFU).
    roof = max((r["matmul_peak_gflops"] for r in results), default=0.0)
    lines.append(f"MFU against the highest matmul peak measured in this run: {roof:.0f} GFLOP/s (fp32)")
    for table in dict.fromkeys(r["table"] for r in results):
        lines += [
            "", f"**{table}**", "",
            "| environment | framework | real tokens/s (min-max) | peak RSS (GB) | MFU | matmul peak (GFLOP/s) |",
            "|---|---|---:|---:|---:|---:|",
        ]  # fmt: skip
        for r in results:
            if r["table"] == table:
                spread = r["tokens_per_sec_all"]
                lines.append(
                    f"| {r['environment']} | {r['framework']} | {r['tokens_per_sec']:.0f} "
                    f"({min(spread):.0f}-{max(spread):.0f}) | {r['peak_rss_gb']:.2f} | "
                    f"{r['mfu'] * r['matmul_peak_gflops'] / roof:.1%} | "
                    f"{r['matmul_peak_gflops']:.0f} |"
                )
    ours = {r["environment"]: r for r in results if r["framework"] == "phi3lit"}
    lines.append("")
    for r in results:
        if r["framework"] == "phi3lit" or r["environment"] not in ours:
            continue
        mine = ours[r["environment"]]
        if r["table"] == "side by side":  # the other framework against phi3lit
            speed, memory = mine["tokens_per_sec"] / r["tokens_per_sec"], mine["peak_rss_gb"] / r["peak_rss_gb"]
            lines.append(f"- phi3lit / {r['framework']} ({r['environment']}): {speed:.2f}x tokens/s, {memory:.2f}x RSS")
        else:  # a switched option against phi3lit's default
            speed, memory = r["tokens_per_sec"] / mine["tokens_per_sec"], r["peak_rss_gb"] / mine["peak_rss_gb"]
            lines.append(f"- {r['framework']} / phi3lit defaults: {speed:.2f}x tokens/s, {memory:.2f}x RSS")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
