"""The Lightning (and torch) internals phi3lit relies on, in one place, each pinned by a test
(tests/test_lightning_compat.py).

Lightning has no public API for these; each function says what it reads and why phi3lit needs it. An upgrade that
moves one breaks that test here, not a training run.
"""

from __future__ import annotations


def batches_processed(trainer) -> int:
    """Micro-batches the training loop has processed in the current epoch (what a mid-epoch resume restarts
    after). Lightning keeps this in the epoch loop's progress tracker and restores it from checkpoints."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def accumulating(trainer) -> bool:
    """True on a micro-batch that is not the last of its optimizer step (gradient accumulation is still going):
    a log or a stop then would split an optimizer step."""
    return trainer.fit_loop._should_accumulate()


def logging_this_step(trainer) -> bool:
    """True on the steps where Lightning hands the logged metrics to the loggers (every `log_every_n_steps`): the
    time to read device-side values without an extra host sync."""
    return trainer._logger_connector.should_update_logs


def skip_step_if(optimizer, flag) -> None:
    """Make a fused torch optimizer's next step a no-op where the device tensor `flag` is 1 (no host sync).

    torch's fused Adam/AdamW/SGD read `optimizer.found_inf` in `step()`, the attribute GradScaler sets for them; it
    is not a documented API, so it is set only here (torch, not Lightning, but the same kind of pin).
    """
    optimizer.found_inf = flag.float()


def last_checkpoint_written(checkpoint_callback, path) -> None:
    """Tell Lightning's `ModelCheckpoint` that `last.ckpt` was written (by phi3lit's `RunGuard`, inside the epoch).

    Its `on_train_end` writes `last.ckpt` again unless it saved one itself in this process; written there, after
    the loop, the checkpoint's loop state says the epoch finished, and a resume would skip the rest of the epoch.
    """
    checkpoint_callback._last_checkpoint_saved = str(path)
