"""Reliability: stop cleanly on a signal with a checkpoint to resume from, always checkpoint the final step, and
refuse a run folder that cannot take checkpoints. (Checkpoint files are written atomically by
`phi3lit.checkpoint.AtomicCheckpointIO`, which the CLI gives the Trainer as a plugin.)
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from phi3lit.errors import EnvironmentProblem
from phi3lit.lightning_compat import accumulating, last_checkpoint_written
from phi3lit.run.runfolder import training_started


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

    def on_train_start(self, trainer, pl_module) -> None:
        training_started()  # from here on a failure keeps the run folder (it holds a run)
        # Installed after Lightning's own handlers, which would raise on SIGTERM without saving.
        for name in self.signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._received == "SIGINT" and signum == signal.SIGINT:  # impatient second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._received = signal.Signals(signum).name  # act at the next step boundary, not mid-step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The checkpoint a run ends with is written here, at the batch end, for every way a fit ends mid-epoch (a
        # signal, max_steps, a callback that stopped it): only inside the epoch does Lightning's loop state agree
        # with the data position. After the loop (on_train_end) Lightning counts the epoch as finished, and a
        # resume from such a checkpoint would start the next epoch, skipping the rest of this one.
        if accumulating(trainer):
            return
        if self._received is not None:
            last = self._save_last(trainer)
            rank_zero_info(
                f"[phi3lit] {self._received}: saved {last} at step {trainer.global_step}; stopping. "
                f"Resume with:\n  {resume_command()}"
            )
            self.preempted = True
            trainer.should_stop = True
            self._received = None
        elif self._ends_here(trainer) and trainer.checkpoint_callback is not None and not trainer.fast_dev_run:
            self._save_last(trainer)

    @staticmethod
    def _ends_here(trainer) -> bool:
        """Whether the fit ends after this batch: max_steps reached, or a callback asked it to stop."""
        return trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        # A callback that stops the fit from a validation (EarlyStopping) does so after this step's batch end: save
        # here, still inside the epoch, for the same reason as in on_train_batch_end.
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run
        if fitting and trainer.should_stop and not self.preempted and trainer.checkpoint_callback is not None:
            self._save_last(trainer)

    def _save_last(self, trainer) -> Path:
        callback = trainer.checkpoint_callback
        path = Path(callback.dirpath if callback else trainer.default_root_dir) / "last.ckpt"
        trainer.save_checkpoint(path)
        if callback is not None:  # so its own save at the end of training does not overwrite this one
            last_checkpoint_written(callback, path)
        return path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.saved_step = checkpoint["global_step"]

    def on_train_end(self, trainer, pl_module) -> None:
        # A fit that ends at an epoch's end (max_epochs, or max_steps on an epoch's last batch) when no periodic
        # save fell on its last step: the epoch is over, so the loop's state and the data position agree here.
        # Without this, last.ckpt would be older than the adapter, and export/predict would use older weights.
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


def was_preempted(trainer) -> bool:
    """Whether a signal stopped this fit (a `RunGuard` saved and stopped it): the run is unfinished."""
    return any(isinstance(cb, RunGuard) and cb.preempted for cb in trainer.callbacks)


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
