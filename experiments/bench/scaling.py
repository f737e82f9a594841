"""How phi3lit's training throughput and peak memory grow with sequence length and LoRA rank.

    python experiments/bench/scaling.py                      # the full sweep (minutes per point on a small CPU)
    python experiments/bench/scaling.py --steps 1 --warmup 1 --lengths 512 --ranks 4    # quick

Same bench model and data as run.py (tiny Phi-3: hidden 384, 4 layers, 6 heads, intermediate 1024, vocabulary
32,064), fp32, LoRA alpha = 2r, dropout 0.05 on every linear projection, phi3lit's default attention and
allocator (as the CLI runs it). Two sweeps: packed row length 512..4096 at rank 16, and rank 4..128 at length
1024. Every optimizer step holds 4096 token slots (4096 // length rows), so tokens/s compare across lengths.
Each point runs in a fresh process so its peak RSS is its own; the first `--warmup` steps are not timed.
Reported: real (non-padding) tokens/s, peak RSS (ru_maxrss), conversations per packed row.
Writes scaling.json, scaling.md and scaling.png beside this file (or --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_run", HERE / "run.py")  # run.py is a script, not a package
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TOKENS_PER_STEP = 4096  # slots per optimizer step, whatever the row length (--tokens_per_step)
RANK_AT = 16  # rank of the length sweep
LENGTH_AT = 1024  # length of the rank sweep


def measure(
    model_dir: str, seq_len: int, rank: int, steps: int, warmup: int, allocator: str, attn: str | None, slots: int
) -> dict:
    """One point, in this process: train `warmup + steps` steps and time the last `steps`."""
    import lightning as L

    from phi3lit.data import IGNORE_INDEX, ChatDataModule
    from phi3lit.model.lora import LoraSpec
    from phi3lit.model.module import Phi3LoRA
    from phi3lit.run.allocator import keep_freed_memory

    if allocator == "keep":  # what the CLI does by default, before any weights are allocated
        keep_freed_memory()
    clock = bench.Clock(warmup, bench.SHAPE["hidden_size"], bench.SHAPE["num_hidden_layers"])
    docs = {"starts": 0, "rows": 0}

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if clock.step >= clock.warmup:
                # Each conversation starts at position 0; so does the padding tail, which holds pad ids (0, <unk>).
                starts = (batch["position_ids"] == 0) & (batch["input_ids"] != 0)
                docs["starts"] += int(starts.sum())
                docs["rows"] += batch["input_ids"].shape[0]
            trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            clock.batch(int(batch["real_tokens"]), int((batch["position_ids"] + 1).sum()), trained)
            clock.step_end()

    L.seed_everything(0)
    rows = slots // seq_len
    # Without --attn no option is passed: the point measures phi3lit's defaults.
    options = {"attn_implementation": attn} if attn else {}
    lora = LoraSpec(r=rank, alpha=2 * rank, dropout=0.05)
    module = Phi3LoRA(pretrained=model_dir, lora=lora, **options)
    dm = ChatDataModule(bench.data_path(), val_fraction=0.0, tokenizer=model_dir, max_length=seq_len, batch_size=rows)
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=steps + warmup, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Timer()], num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, dm)
    result = clock.result((0, 0), 1.0, "phi3lit")  # no FLOP count: MFU is run.py's business
    return {
        "seq_len": seq_len, "rank": rank, "rows_per_step": rows, "tokens_per_sec": result["tokens_per_sec"],
        "peak_rss_gb": result["peak_rss_gb"], "timed_steps": result["timed_steps"],
        "docs_per_row": docs["starts"] / max(1, docs["rows"]), "attn": module.hparams.attn_implementation,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per point")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1: the clock starts there)")
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 1024, 2048, 4096], help="row lengths")
    parser.add_argument("--ranks", type=int, nargs="*", default=[4, 8, 16, 32, 64, 128], help="LoRA ranks (none: skip)")
    parser.add_argument("--tokens_per_step", type=int, default=TOKENS_PER_STEP, help="token slots per step")
    parser.add_argument("--allocator", choices=["keep", "system"], default="keep", help="as the CLI's --allocator")
    parser.add_argument("--attn", help="model.attn_implementation (default: phi3lit's), e.g. sdpa for the dense mask")
    parser.add_argument("--out", default=str(HERE), help="folder for scaling.json / .md / .png")
    parser.add_argument("--reference", help="a scaling.json of another run (e.g. --attn sdpa) to draw dashed")
    parser.add_argument("--replot", action="store_true", help="only redraw scaling.png from --out/scaling.json")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # child mode: "seq_len,rank"
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    slots = args.tokens_per_step
    if args.replot:
        plot(json.loads((Path(args.out) / "scaling.json").read_text()), Path(args.out) / "scaling.png", args.reference)
        return 0
    if args.point:
        seq_len, rank = map(int, args.point.split(","))
        result = measure(args.model, seq_len, rank, args.steps, args.warmup, args.allocator, args.attn, slots)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if any(n <= 0 or slots % n for n in [*args.lengths, LENGTH_AT]):  # else steps would not hold the same tokens
        parser.error(f"--lengths (and the rank sweep's {LENGTH_AT}) must divide --tokens_per_step {slots}")

    from phi3lit.hub import cache_root

    model_dir = bench.build_model(cache_root() / "bench-phi3")  # the same model folder run.py uses
    points = [("seq_len", n, RANK_AT) for n in args.lengths] + [("rank", LENGTH_AT, r) for r in args.ranks]
    results, failed = [], 0
    for sweep, seq_len, rank in points:
        cmd = [sys.executable, __file__, "--point", f"{seq_len},{rank}", "--model", str(model_dir),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--allocator", args.allocator,
               "--tokens_per_step", str(slots),
               *(["--attn", args.attn] if args.attn else [])]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=bench.ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{sweep} sweep, length {seq_len}, rank {rank} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            failed += 1
            continue
        result = {"sweep": sweep} | json.loads(line[-1][len("RESULT ") :])
        print(json.dumps(result), flush=True)
        results.append(result)
    write(results, Path(args.out), args)
    return 1 if failed else 0


def write(results: list[dict], out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(results, indent=2))
    command = shlex.join(["python", os.path.relpath(__file__, bench.ROOT), *sys.argv[1:]])
    attn = args.attn or "phi3lit default"
    lines = [f"`{command}`, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, allocator {args.allocator}, "
             f"attention {attn}", ""]  # fmt: skip
    for sweep, title, key in (("seq_len", f"Row length (rank {RANK_AT})", "length"),
                              ("rank", f"LoRA rank (length {LENGTH_AT})", "rank")):  # fmt: skip
        lines += [f"### {title}", "", f"| {key} | rows/step | real tokens/s | peak RSS (GB) | conversations/row |",
                  "|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in (r for r in results if r["sweep"] == sweep):
            lines.append(f"| {r[sweep]} | {r['rows_per_step']} | {r['tokens_per_sec']:.0f} | {r['peak_rss_gb']:.2f} "
                         f"| {r['docs_per_row']:.1f} |")  # fmt: skip
        lines.append("")
    (out / "scaling.md").write_text("\n".join(lines))
    print("\n".join(lines))
    plot(results, out / "scaling.png", args.reference)


def plot(results: list[dict], path: Path, reference: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a bench machine
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (sweep, label) in enumerate((("seq_len", f"row length (rank {RANK_AT})"),
                                          ("rank", f"LoRA rank (length {LENGTH_AT})"))):  # fmt: skip
        rows = sorted((r for r in results if r["sweep"] == sweep), key=lambda r: r[sweep])
        xs = [r[sweep] for r in rows]
        for row, (key, ylabel) in enumerate((("tokens_per_sec", "real tokens/s"), ("peak_rss_gb", "peak RSS (GB)"))):
            ax = axes[row][col]
            name = rows[0].get("attn", "phi3lit default") if rows else ""
            ax.plot(xs, [r[key] for r in rows], marker="o", label=f"attention: {name}")
            if reference:  # e.g. the same sweep with transformers' dense block mask
                ref = sorted((r for r in json.loads(Path(reference).read_text()) if r["sweep"] == sweep),
                             key=lambda r: r[sweep])  # fmt: skip
                if ref:
                    name = ref[0].get("attn", Path(reference).parent.name)
                    ax.plot([r[sweep] for r in ref], [r[key] for r in ref], "s--", label=f"attention: {name}")
                    ax.legend(fontsize=8)
            ax.set_xscale("log", base=2)
            if xs:  # label the measured points, not powers of two matplotlib picks
                ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    slots = results[0]["rows_per_step"] * results[0]["seq_len"] if results else TOKENS_PER_STEP
    fig.suptitle(f"phi3lit scaling, {slots} token slots per step, fp32, {os.cpu_count()} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
