"""Where a phi3lit training step spends its CPU time, by op: the profile table of issue 30.

    python experiments/bench/profile_ops.py                    # 2 warm-up steps, 3 profiled, the bench's default recipe
    python experiments/bench/profile_ops.py --steps 5 --dropout 0

The same model, data and recipe as `run.py`'s phi3lit side (tiny Phi-3 of the real 32,064-token vocabulary, LoRA
r=16 / alpha=32 / dropout 0.05 on all linear projections, fp32, 4 x 1024 tokens per step), run by the same
Lightning Trainer; `torch.profiler` records the steps after the warm-up. Writes profile_ops.md beside this file (or
--out): self CPU time per op (time inside the op itself, not its children), its share of the profiled steps, and
the share per kind (matrix multiplies, attention, element-wise, optimizer, the rest), which says how much of a
step a faster matmul could ever win back.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run import ROWS, build_model, data_path  # noqa: E402

# Which ops count as which kind in the summary (matched on the op's name).
KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "optimizer": ("_fused_adam", "_foreach_", "Optimizer."),
    "element-wise": ("aten::mul", "aten::add", "aten::silu", "aten::sub", "aten::div", "aten::pow", "aten::rsqrt",
                     "aten::mean", "aten::neg", "aten::cat", "aten::copy_", "aten::to", "aten::_to_copy",
                     "aten::where", "aten::bernoulli", "aten::random_", "aten::ge", "aten::dropout",
                     "aten::native_dropout", "aten::fill_", "aten::zero_", "aten::clone", "aten::exp",
                     "aten::log_softmax", "aten::_log_softmax", "aten::sum", "aten::masked_fill",
                     "aten::embedding", "aten::index", "aten::cos", "aten::sin"),
}  # fmt: skip


def kind_of(name: str) -> str:
    for kind, names in KINDS.items():
        if any(name.startswith(n) or n in name for n in names):
            return kind
    return "other"


def profile(model_dir: str, warmup: int, steps: int, dropout: float):
    import lightning as L
    import torch

    from phi3lit.data import ChatDataModule
    from phi3lit.model.lora import LoraSpec
    from phi3lit.model.module import Phi3LoRA
    from phi3lit.run.allocator import keep_freed_memory

    keep_freed_memory()  # as the CLI does
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    class Window(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                prof.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == warmup + steps - 1:
                prof.stop()

    L.seed_everything(0)
    module = Phi3LoRA(pretrained=model_dir, lora=LoraSpec(r=16, alpha=32, dropout=dropout))
    dm = ChatDataModule(data_path(), val_fraction=0.0, tokenizer=model_dir, max_length=1024, batch_size=ROWS)
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=warmup + steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Window()], num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, dm)
    return prof.key_averages()


def table(averages, steps: int, top: int, device: bool = False) -> str:
    """Markdown: time per kind of op, then the top ops. `device`: GPU kernel time of each op (its launches)."""
    import torch

    def spent(a) -> float:
        return a.self_device_time_total if device else a.self_cpu_time_total

    # On a GPU, ops (CPU events) carry their kernels' device time; the kernels' own rows would count it twice.
    ops = [a for a in averages if not device or a.device_type == torch.autograd.DeviceType.CPU]
    rows = sorted((a for a in ops if spent(a) > 0), key=lambda a: -spent(a))
    total = sum(spent(a) for a in rows)
    kinds: dict[str, float] = {}
    for a in rows:
        kinds[kind_of(a.key)] = kinds.get(kind_of(a.key), 0.0) + spent(a)
    what = "self device (GPU) time" if device else "self CPU time"
    lines = [f"Profiled {steps} steps: {total / 1e6:.2f} s of {what}, {total / 1e6 / steps:.3f} s per step.", ""]
    lines += ["| kind | s per step | share |", "|---|---|---|"]
    by_time = sorted(kinds.items(), key=lambda kv: -kv[1])
    lines += [f"| {k} | {v / 1e6 / steps:.3f} | {v / total:.1%} |" for k, v in by_time]
    lines += ["", f"Top {top} ops by {what}:", "", "| op | kind | calls per step | ms per step | share |",
              "|---|---|---|---|---|"]  # fmt: skip
    for a in rows[:top]:
        lines.append(f"| `{a.key}` | {kind_of(a.key)} | {a.count / steps:.0f} | "
                     f"{spent(a) / 1e3 / steps:.1f} | {spent(a) / total:.1%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    cache = Path(os.environ.get("PHI3LIT_CACHE", Path.home() / ".cache" / "phi3lit"))
    model_dir = str(build_model(cache / "bench-phi3"))  # the one run.py builds
    averages = profile(model_dir, args.warmup, args.steps, args.dropout)
    command = " ".join(["python experiments/bench/profile_ops.py", *sys.argv[1:]])
    text = f"# phi3lit training step by op\n\n    {command}\n\n" + table(averages, args.steps, args.top)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_ops.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
