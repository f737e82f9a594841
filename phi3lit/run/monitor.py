"""Training telemetry: tokens/s, MFU, padding efficiency, peak memory, and the end-of-fit curves.

Why not Lightning's `ThroughputMonitor` and `measure_flops`: phi3lit counts FLOPs from the model's shapes per batch
(`model_flops`), because a packed batch's cost depends on what the counters cannot see: the LM head runs at trained
positions only, and attention costs grow with each conversation's own length (the block-causal mask), not the row's.
Time spent validating inside fit is also left out of training throughput. The device peak does come from
Lightning's `get_available_flops` where it knows the device; on a CPU, which it does not know, a matmul is measured
(once per machine: the result is cached).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from phi3lit.data.labels import IGNORE_INDEX
from phi3lit.files import write_text_atomic
from phi3lit.hub import cache_root
from phi3lit.lightning_compat import accumulating, logging_this_step
from phi3lit.run.events import read_scalars


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.25) -> float:
    """Achieved FLOP/s of a square matmul on this device: the roof MFU is measured against when none is known.

    Best of three rounds, so a round that shares the cores with start-up work does not lower the roof.
    """
    g = torch.Generator(device).manual_seed(0)  # its own stream: measuring must not shift the run's seeded RNG
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
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


def _cpu_roof_key(dtype: torch.dtype) -> str:
    """What the measured roof depends on: the CPU model, the threads torch uses, the BLAS (torch's build), dtype."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")] if cpuinfo.exists() else []
    model = names[0].split(":", 1)[1].strip() if names else platform.processor() or platform.machine()
    return f"{model} | {os.cpu_count()} cpus | {torch.get_num_threads()} threads | torch {torch.__version__} | {dtype}"


def cpu_roof(dtype: torch.dtype, raised: float | None = None) -> float:
    """The CPU's matmul roof, measured once per machine and kept in phi3lit's cache (`peak_flops.json`).

    Measuring takes ~3 s, which a short run would pay every time. `raised`: a rate training reached above the
    roof (the measurement was low, e.g. on a busy machine); it replaces the kept value, so later runs start there.
    """
    path = cache_root() / "peak_flops.json"
    key = _cpu_roof_key(dtype)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = None
    known = known if isinstance(known, dict) else {}
    if raised is not None:
        value = raised
    elif isinstance(known.get(key), float):
        return known[key]
    else:  # the best of several sizes: one size can sit in a slow spot of the BLAS library's kernels
        value = max(measure_matmul_flops(torch.device("cpu"), dtype, n) for n in (512, 1024, 2048))
    # Atomic: runs starting together never read half a file. A read-only cache costs a measurement per run.
    with contextlib.suppress(OSError):
        write_text_atomic(path, json.dumps({**known, key: value}, indent=1), durable=False)
    return value


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
            peak_flops: the device's peak FLOP/s for `train/mfu`. Default: Lightning's `get_available_flops` (vendor
                dense bf16 peaks of known GPUs), else a measured matmul (on a CPU once per machine: `cpu_roof`).
            plot: write `curves.png` (loss and lr against step) to the run folder at the end of fit.
        """
        self.peak_flops = peak_flops
        self.plot = plot

    def on_fit_start(self, trainer, pl_module) -> None:
        self.flops_per_token, self.head_flops_per_trained, self.attn_flops_per_ctx = model_flops(pl_module)
        device = pl_module.device
        self.peak_source = "monitor.peak_flops"
        self._cached_roof = None  # the dtype of a CPU roof from the cache
        if self.peak_flops is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            known = get_available_flops(device, dtype)  # Lightning's table of vendor peaks (GPUs, TPUs)
            if known:
                self.peak_flops = float(known)
                name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
                self.peak_source = f"Lightning's get_available_flops for {name}, {dtype}"
            elif device.type == "cpu":
                self.peak_flops, self._cached_roof = cpu_roof(dtype), dtype
                self.peak_source = "an estimate: the fastest square matmul measured on this CPU, raised if exceeded"
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
        index = batch.get("loss_index")  # the trained positions (phi3lit.model.loss), found by collate
        self.trained += index.numel() if index is not None else int((labels[:, 1:] != IGNORE_INDEX).sum())
        self.slots += labels.numel()
        self.attn_ctx += (positions + 1).sum()
        # Log once per optimizer step (not per micro-batch), every log_every_n_steps.
        if accumulating(trainer) or not logging_this_step(trainer):
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
            if self._cached_roof is not None:  # kept for the next run on this CPU
                cpu_roof(self._cached_roof, raised=achieved)
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


class RunTensorBoard(TensorBoardLogger):
    """TensorBoard in the run folder, `<run>/tb/`, without Lightning's version_N subfolders (a run folder holds one
    run), and no hp_metric curve (the HPARAMS tab gets the hp/* metrics instead).

    The default logger of `fit` (`fit --print_config` shows it); any other logger replaces it in the config.
    Its one argument has a name no other logger uses, so that switching `trainer.logger` to another class carries
    none of its settings over (jsonargparse keeps the init args the new class shares with the old one).
    """

    def __init__(self, run_dir: str | None = None):
        """
        Args:
            run_dir: the run folder, which receives `tb/`; null: trainer.default_root_dir (the CLI fills it in).
        """
        super().__init__(run_dir or os.getcwd(), name="tb", version="", default_hp_metric=False)


def tensorboard_logger(trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger, wherever it stands in a list of loggers (CSV, W&B, MLflow, ...)."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


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
