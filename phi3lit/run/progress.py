"""Progress for people: plain progress lines for logs that are files, the end-of-fit summary, and a progress bar
in optimizer steps of the whole run."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from phi3lit.run.callbacks import AdapterWriter
from phi3lit.run.monitor import tensorboard_logger
from phi3lit.run.preemption import resume_command, was_preempted


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
        stopped = was_preempted(trainer)
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
        adapter = next((cb for cb in trainer.callbacks if isinstance(cb, AdapterWriter)), None)  # where it wrote
        tensorboard = tensorboard_logger(trainer)
        if trainer.checkpoint_callback:
            lines.append(f"  checkpoints {trainer.checkpoint_callback.dirpath}")
        if tensorboard is not None:
            lines.append(f"  logs        tensorboard --logdir {shlex.quote(str(tensorboard.log_dir))}")
        if stopped:
            lines.append(f"  resume      {resume_command()}")
        elif adapter is not None:
            lines.append(f"  adapter     {root / adapter.dirname}")
            lines.append(f"  next        python -m phi3lit chat --adapter {shlex.quote(str(root / adapter.dirname))}")
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
