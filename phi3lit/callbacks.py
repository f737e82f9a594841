"""Callbacks: telemetry, generation samples, the peft adapter at the end of fit, `predict` output, run guard.

LoRA-only checkpoints are the module's own business (`Phi3LoRA.on_save_checkpoint`), so Lightning's
stock `ModelCheckpoint` writes them; `fit --ckpt_path last` finds `<run dir>/checkpoints/last.ckpt`.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from safetensors import SafetensorError

from phi3lit.checkpoint import AtomicCheckpointIO
from phi3lit.errors import EnvironmentProblem
from phi3lit.export import finish_adapter_folder, format_report
from phi3lit.loss import IGNORE_INDEX


class SaveAdapter(L.Callback):
    def __init__(self, dirname: str = "adapter"):
        """
        Args:
            dirname: folder under `trainer.default_root_dir` that receives the peft adapter
                (`adapter_config.json`, `adapter_model.safetensors`) and the tokenizer at the end of `fit`.
        """
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        preempted = any(getattr(cb, "preempted", False) for cb in trainer.callbacks)
        sharded = isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy)
        if sharded:  # the final last.ckpt (RunGuard.on_train_end) was gathered by every rank: wait for it
            trainer.strategy.barrier()
        if not trainer.is_global_zero or preempted or trainer.fast_dev_run:  # unfinished, or only a check
            return
        out = Path(trainer.default_root_dir) / self.dirname
        if sharded:
            # Reading a sharded model's state on rank 0 alone would wait forever for the other ranks, so the adapter
            # is exported from the full checkpoint instead (the same code as `python -m phi3lit export`).
            from phi3lit.export import export

            ckpt = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
            export(ckpt=str(ckpt), out=str(out))
            rank_zero_info(f"[phi3lit] adapter exported from {ckpt} to {out}")
            return
        # Written whole into a temporary folder, then swapped in: a full disk or a kill mid-save leaves the previous
        # adapter (or none), never a folder with a 0-byte file in it.
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            pl_module.model.save_pretrained(tmp)
            # The base's own tokenizer files, its public name, a model card saying which clients take it, 0644 files.
            datamodule = trainer.datamodule
            facts = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
            if datamodule is not None:
                facts["datamodule_hyper_parameters"] = dict(datamodule.hparams)
            facts["phi3lit"] = {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}}
            report = finish_adapter_folder(tmp, pl_module, checkpoint=facts)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old)
            else:
                tmp.rename(out)
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk in its own error type
            shutil.rmtree(tmp, ignore_errors=True)
            ckpt = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else trainer.default_root_dir
            why = getattr(e, "strerror", None) or e
            raise EnvironmentProblem(
                f"{out}: could not write the adapter ({why}); nothing partial was left there. The final "
                f"weights are in {Path(ckpt) / 'last.ckpt'}: free space, then python -m phi3lit export --ckpt "
                f"{Path(ckpt) / 'last.ckpt'} --out {out}"
            ) from None
        rank_zero_info(f"[phi3lit] adapter saved to {out} (load with peft.PeftModel.from_pretrained(base, path))")
        rank_zero_info(format_report(report, out))  # which clients take it as it is, and when to `export` first


class PredictionWriter(BasePredictionWriter):
    def __init__(self, filename: str = "predictions.jsonl"):
        """
        Args:
            filename: file under `trainer.default_root_dir` for `predict`: each row is the prompt's
                `messages` plus the generated `reply` (and `reference`: the reply the prompt file already had, if any).
        """
        super().__init__(write_interval="batch")
        self.filename = filename

    def on_predict_start(self, trainer, pl_module) -> None:
        path = Path(trainer.default_root_dir) / self.filename
        n = 1
        while path.exists():  # earlier predictions stay: predictions-2.jsonl, -3, ...
            n += 1
            path = path.with_name(f"{Path(self.filename).stem}-{n}{Path(self.filename).suffix}")
        self.path = path
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"[phi3lit] predictions written to {self.path}", flush=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with open(self.path, "a") as f:
            references = batch.get("references") or [None] * len(prediction)
            for messages, reply, reference in zip(batch["messages"], prediction, references, strict=True):
                row = {"messages": messages, "reply": reply}
                if reference is not None:  # the conversation's own answer, kept beside the model's
                    row["reference"] = reference
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------- telemetry
# Dense bf16 tensor-core peaks (FLOP/s) from vendor spec sheets, used when `monitor.peak_flops` is not set.
KNOWN_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.25) -> float:
    """Achieved FLOP/s of a square matmul on this device: the roof MFU is measured against when none is known.

    Best of three rounds, so a round that shares the cores with start-up work does not lower the roof.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        iters, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    return best


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max-allocated on GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def model_flops(pl_module) -> tuple[int, int, int]:
    """FLOPs of one training step: (per token, per trained token, per token per attended position).

    Frozen matmuls cost forward (2N) + input-gradient (2N) per token; trained ones also their weight gradient
    (+2N). Embedding lookups are not matmuls. The LM head is needed only where the loss is: phi3lit runs it at
    trained positions only, so it is counted there (4 x its weights each). Attention adds 12 * layers * hidden
    per token per attended position of its own document (forward 4 * hidden * ctx, backward twice that).
    """
    trainable, total = pl_module.param_counts()
    causal_lm = pl_module.model.get_base_model()
    embed = causal_lm.get_input_embeddings().weight.numel()
    head = causal_lm.get_output_embeddings().weight.numel()
    config = causal_lm.config
    return (
        4 * (total - trainable - embed - head) + 6 * trainable,
        4 * head,
        12 * config.num_hidden_layers * config.hidden_size,
    )


class TrainMonitor(L.Callback):
    def __init__(self, peak_flops: float | None = None, plot: bool = True):
        """
        Args:
            peak_flops: the device's peak FLOP/s for `train/mfu`. Default: the spec sheet's dense bf16 peak for
                known GPUs (H100/H200 989e12), else a matmul measured on the device at start.
            plot: write `curves.png` (loss and lr against step) to the run folder at the end of fit.
        """
        self.peak_flops = peak_flops
        self.plot = plot

    def on_fit_start(self, trainer, pl_module) -> None:
        self.flops_per_token, self.head_flops_per_trained, self.attn_flops_per_ctx = model_flops(pl_module)
        device = pl_module.device
        self.peak_source = "monitor.peak_flops"
        if self.peak_flops is None:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
            known = [v for k, v in KNOWN_PEAKS.items() if k in name]
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            if known:
                self.peak_flops, self.peak_source = known[0], f"the {name} spec sheet"
            else:  # the best of several sizes: one size can sit in a slow spot of the BLAS library's kernels
                self.peak_flops = max(measure_matmul_flops(device, dtype, n) for n in (512, 1024, 2048))
                self.peak_source = "an estimate: the fastest square matmul measured at start, raised if exceeded"
        rank_zero_info(f"[phi3lit] MFU is measured against {self.peak_flops / 1e12:.2f} TFLOP/s ({self.peak_source})")
        self._reset(time.perf_counter())
        self.run_tokens, self.run_seconds = 0, 0.0

    def _reset(self, now: float) -> None:
        self.t0, self.paused = now, 0.0
        self.real = self.trained = self.slots = self.attn_ctx = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        labels, positions = batch["labels"], batch["position_ids"]
        real = batch.get("real_tokens")
        self.real += int(real) if real is not None else labels.numel()
        self.trained += (labels[:, 1:] != IGNORE_INDEX).sum()  # stays on device until a log step
        self.slots += labels.numel()
        self.attn_ctx += (positions + 1).sum()
        # Log once per optimizer step (not per micro-batch), every log_every_n_steps.
        if trainer.fit_loop._should_accumulate() or not trainer._logger_connector.should_update_logs:
            return
        now = time.perf_counter()
        seconds = max(now - self.t0 - self.paused, 1e-9)
        flops = (
            self.flops_per_token * self.real
            + self.head_flops_per_trained * float(self.trained)
            + self.attn_flops_per_ctx * float(self.attn_ctx)
        )
        stats = {
            "train/tokens_per_sec": self.real / seconds,
            "train/trained_tokens_per_sec": float(self.trained) / seconds,
            "train/mfu": self._mfu(flops / seconds),
            "train/padding_efficiency": self.real / self.slots,
            "train/peak_memory_gb": peak_memory_gb(pl_module.device),
        }
        pl_module.log("train/tokens_per_sec", stats.pop("train/tokens_per_sec"), prog_bar=True)
        pl_module.log_dict(stats)
        self.run_tokens += self.real
        self.run_seconds += seconds
        self._reset(now)

    def _mfu(self, achieved: float) -> float:
        if achieved > self.peak_flops and self.peak_source.startswith("an estimate"):
            # The model ran faster than the measured "peak": the measurement was low (a busy core at start, a
            # kernel the probe did not hit). MFU above 1 means nothing, so the estimate is raised to what was seen.
            rank_zero_info(f"[phi3lit] MFU peak estimate raised to {achieved / 1e12:.3f} TFLOP/s (reached in training)")
            self.peak_flops = achieved
        return achieved / self.peak_flops

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation inside fit is not training time. (`trainer.training` is False here, inside the validation
        # loop, so it cannot tell; the entry point can.)
        if trainer.state.fn == TrainerFn.FITTING:
            self.paused += time.perf_counter() - self._val_start

    def on_fit_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        final = {
            "hp/val_loss": metrics.get("val/loss"),
            "hp/val_ppl": metrics.get("val/ppl"),
            "hp/tokens_per_sec": self.run_tokens / self.run_seconds if self.run_seconds else None,
        }
        final = {k: float(v) for k, v in final.items() if v is not None}
        for logger in trainer.loggers:
            logger.log_metrics(final, step=trainer.global_step)
            logger.save()
        if self.plot and trainer.is_global_zero:
            plot_curves(trainer)


def tensorboard_logger(trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger, wherever it stands in a list of loggers (CSV, W&B, MLflow, ...)."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def plot_curves(trainer) -> Path | None:
    """`<run>/curves.png`: train and val loss, and the learning rate, against step; also a TensorBoard image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tensorboard = tensorboard_logger(trainer)
    log_dir = tensorboard.log_dir if tensorboard else None
    if log_dir is None or not Path(log_dir).is_dir():
        return None
    scalars = read_scalars(log_dir)
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for tag, style in (("train/loss", "-"), ("val/loss", "o-")):
        if tag in scalars:
            steps, values = zip(*scalars[tag], strict=True)
            ax_loss.plot(steps, values, style, label=tag)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    if ax_loss.get_legend_handles_labels()[0]:  # a run shorter than log_every_n_steps has no curve yet
        ax_loss.legend()
    if "train/lr" in scalars:
        steps, values = zip(*scalars["train/lr"], strict=True)
        ax_lr.plot(steps, values)
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    out = Path(trainer.default_root_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    tensorboard.experiment.add_figure("curves", fig, global_step=trainer.global_step)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------- generation samples
class SampleReplies(L.Callback):
    def __init__(
        self,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ):
        """
        Args:
            prompts: user messages answered at every validation; replies go to TensorBoard's TEXT tab.
            prompts_file: more prompts: a .jsonl of `{"messages": [...]}` or a text file, one prompt per line.
            max_new_tokens: reply length limit; decoding also stops at <|end|> or <|endoftext|>.
            temperature: 0 for greedy decoding, else sampling at this temperature.
            top_p: nucleus sampling threshold when sampling.
        """
        conversations = [[{"role": "user", "content": p}] for p in prompts or []]
        if prompts_file:
            path = Path(prompts_file)
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            if path.suffix == ".jsonl":
                conversations += [json.loads(line)["messages"] for line in lines]
            else:
                conversations += [[{"role": "user", "content": line}] for line in lines]
        self.conversations = conversations
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.history: list[tuple[int, list[str]]] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.conversations or trainer.sanity_checking or not trainer.is_global_zero:
            return
        from phi3lit.generate import generate_replies

        replies = generate_replies(pl_module.model, pl_module.tokenizer, self.conversations, **self.kw)
        self.history.append((trainer.global_step, replies))
        rows = ["| prompt | reply |", "| --- | --- |"]
        for conv, reply in zip(self.conversations, replies, strict=True):
            cell = lambda t: t.replace("|", "\\|").replace("\n", "<br>")
            rows.append(f"| {cell(conv[-1]['content'])} | {cell(reply)} |")
        tensorboard = tensorboard_logger(trainer)
        if tensorboard is not None:
            tensorboard.experiment.add_text("samples", "\n".join(rows), global_step=trainer.global_step)


# ---------------------------------------------------------------------------- reliability
class RunGuard(L.Callback):
    def __init__(self, min_free_mb: int = 256, signals: list[str] | None = None):
        """
        Args:
            min_free_mb: `fit` refuses to start when the run folder's disk has less free space than this.
            signals: signals that mean "save and stop": Ctrl-C (SIGINT) and cluster preemption (SIGTERM, SIGUSR1)
                by default. A second Ctrl-C while the save is pending stops at once, as Ctrl-C usually does.
        """
        self.min_free_mb = min_free_mb
        self.signals = signals if signals is not None else ["SIGINT", "SIGTERM", "SIGUSR1"]
        self.preempted = False
        self.saved_step: int | None = None  # global step of the newest checkpoint this run wrote
        self._received: str | None = None
        self._previous: dict = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":  # leave FSDP/DeepSpeed IO alone
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_start(self, trainer, pl_module) -> None:
        # Installed after Lightning's own handlers, which would raise on SIGTERM without saving.
        for name in self.signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._received == "SIGINT" and signum == signal.SIGINT:  # impatient second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._received = signal.Signals(signum).name  # act at the next step boundary, not mid-step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._received is None or trainer.fit_loop._should_accumulate():
            return
        last = self._save_last(trainer)
        rank_zero_info(
            f"[phi3lit] {self._received}: saved {last} at step {trainer.global_step}; stopping. "
            f"Resume with:\n  {resume_command()}"
        )
        self.preempted = True
        trainer.should_stop = True
        self._received = None

    def _save_last(self, trainer) -> Path:
        folder = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else trainer.default_root_dir
        path = Path(folder) / "last.ckpt"
        trainer.save_checkpoint(path)
        return path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.saved_step = checkpoint["global_step"]

    def on_train_end(self, trainer, pl_module) -> None:
        # max_steps need not be a multiple of checkpoint.every_n_train_steps: without this, last.ckpt would be
        # older than the adapter, and export/predict from it would silently use older weights.
        if trainer.fast_dev_run:  # a check run writes nothing
            return
        if not self.preempted and self.saved_step != trainer.global_step and trainer.checkpoint_callback:
            self._save_last(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def resume_command() -> str:
    """The command line that continues this run: the same arguments, with `--ckpt_path last`."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--ckpt_path":
            skip = True
        elif not a.startswith("--ckpt_path="):
            args.append(a)
    return shlex.join(["python", "-m", "phi3lit", *args, "--ckpt_path", "last"])


# ---------------------------------------------------------------------------- plain progress
class ProgressLog(L.Callback):
    def __init__(self, lines: Literal["auto", "always", "never"] = "auto"):
        """
        Args:
            lines: a plain progress line every `trainer.log_every_n_steps` optimizer steps (step/max_steps, loss,
                val loss, lr, tokens/s, ETA), for logs that are files (SLURM, nohup). `auto`: when stdout is not
                a terminal, or the progress bar is off. The end-of-fit summary is printed in every mode.
        """
        self.lines = lines

    def on_fit_start(self, trainer, pl_module) -> None:  # not on_train_start: a resume past max_steps has none
        tty = sys.stdout.isatty() and trainer.progress_bar_callback is not None
        self.enabled = self.lines == "always" or (self.lines == "auto" and not tty)
        self.start, self.start_step, self.printed = time.perf_counter(), trainer.global_step, trainer.global_step
        self.paused, self.val_losses = 0.0, []

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        self.paused += time.perf_counter() - self._val_start
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.val_losses.append((trainer.global_step, float(loss)))

    def total_steps(self, trainer) -> int:
        return trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, self.total_steps(trainer)
        if not self.enabled or step == self.printed or (step % trainer.log_every_n_steps and step != total):
            return
        self.printed = step
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        elapsed = time.perf_counter() - self.start - self.paused
        eta = elapsed / max(1, step - self.start_step) * max(0, total - step)
        parts = [f"step {step}/{total}"]
        for key, label, fmt in (
            ("train/loss", "loss", ".4f"), ("val/loss", "val", ".4f"), ("train/lr", "lr", ".2e"),
            ("train/tokens_per_sec", "tok/s", ",.0f"),
        ):  # fmt: skip
            if key in m:
                parts.append(f"{label} {float(m[key]):{fmt}}")
        parts.append(f"ETA {_duration(eta)}")
        print("[phi3lit] " + " | ".join(parts), flush=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        stopped = any(getattr(cb, "preempted", False) for cb in trainer.callbacks)
        if trainer.fast_dev_run:
            loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
            print(
                f"[phi3lit] check passed: config, data, model and {trainer.global_step} training step ran "
                f"(loss {loss:.4f}); nothing was written",
                flush=True,
            )
            return
        state = "stopped" if stopped else "done"
        lines = [f"[phi3lit] fit {state}: step {trainer.global_step}/{self.total_steps(trainer)}"]
        if self.val_losses:
            best_step, best = min(self.val_losses, key=lambda x: x[1])
            lines.append(f"  val loss    best {best:.4f} (step {best_step}), final {self.val_losses[-1][1]:.4f}")
        lines.append(f"  wall time   {_duration(time.perf_counter() - self.start)}")
        adapter = next((cb for cb in trainer.callbacks if isinstance(cb, SaveAdapter)), None)
        tensorboard = tensorboard_logger(trainer)
        if trainer.checkpoint_callback:
            lines.append(f"  checkpoints {trainer.checkpoint_callback.dirpath}")
        if tensorboard is not None:
            lines.append(f"  logs        tensorboard --logdir {tensorboard.log_dir}")
        if stopped:
            lines.append(f"  resume      {resume_command()}")
        elif adapter is not None:
            lines.append(f"  adapter     {root / adapter.dirname}")
            lines.append(f"  next        python -m phi3lit chat --adapter {root / adapter.dirname}")
        print("\n".join(lines), flush=True)


class StepProgressBar(TQDMProgressBar):
    """The progress bar in optimizer steps of the whole run (`step 40/150`, ETA to the end), not per epoch.

    Lightning's bars count batches of the current epoch and label them `Epoch 0/-2` when the run is bounded by
    `max_steps`; phi3lit runs are step-based, so the bar shows what the schedule and checkpoints count.
    """

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches))
        bar.n = trainer.global_step
        bar.set_description("step")
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar.n != trainer.global_step:  # once per optimizer step, not per micro-batch
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def check_writable(root: Path, min_free_mb: int) -> None:
    """Fail before training, with the folder named, when the run folder cannot take checkpoints."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".phi3lit-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise EnvironmentProblem(
            f"trainer.default_root_dir={str(root)!r} is not writable ({e.strerror or e}); "
            "choose a folder you can write to with --trainer.default_root_dir"
        ) from None
    free_mb = shutil.disk_usage(root).free / 2**20
    if free_mb < min_free_mb:
        raise EnvironmentProblem(
            f"trainer.default_root_dir={str(root)!r} has {free_mb:.0f} MiB free, less than guard.min_free_mb="
            f"{min_free_mb}; free space or choose another folder"
        )
