"""`python -m phi3lit {fit,validate,test,predict} --config FILE.yaml`: LightningCLI over Phi3LoRA + ChatDataModule.

A run lives in one folder, `trainer.default_root_dir`:
    tb/               TensorBoard events and the resolved config.yaml
    checkpoints/      LoRA-only Lightning checkpoints, last.ckpt for `--ckpt_path last`
    adapter/          peft adapter + tokenizer, written at the end of fit
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeTuple, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from phi3lit.allocator import keep_freed_memory
from phi3lit.callbacks import PredictionWriter, SampleReplies, SaveAdapter
from phi3lit.checkpoint import checkpoints_newest_first, newest_intact, read_checkpoint, remove_stale_temps
from phi3lit.checks import check_devices, check_strategy, check_values
from phi3lit.errors import CheckpointError
from phi3lit.monitor import TrainMonitor
from phi3lit.optim import DEFAULTS as OPTIM_DEFAULTS
from phi3lit.optim import carried_over_note
from phi3lit.progress import ProgressLog
from phi3lit.resume import explain, flat_config, resume_diff
from phi3lit.runfolder import check_not_mixing, folder_entries, lock_run_folder, refuse_link
from phi3lit.runguard import RunGuard, check_writable


def _checkpoint_dir(root: str | None) -> str:
    return os.path.join(root or os.getcwd(), "checkpoints")


class RunConfig(SaveConfigCallback):
    """Writes the resolved config to `<run>/config.yaml` (beside the checkpoints) and `tb/config.yaml`, and logs
    it with the LoRA facts to TensorBoard's HPARAMS tab, so runs can be sorted and compared there."""

    resuming = False  # set by the CLI once `--ckpt_path` is known to name a checkpoint

    def setup(self, trainer, pl_module, stage: str) -> None:
        root = Path(trainer.default_root_dir)
        if stage == "fit" and self.resuming:  # a resume: the original config.yaml stays as it was
            if trainer.is_global_zero:
                n = 1 + sum(1 for _ in root.glob("config-resume-*.yaml"))
                refuse_link(root / f"config-resume-{n}.yaml", "a config")
                self.parser.save(self.config, root / f"config-resume-{n}.yaml", skip_none=False, overwrite=True)
            return
        if self.save_to_log_dir and not self.already_saved:  # Lightning's own copy, tb/config.yaml
            log_dir = trainer.log_dir  # asked on every rank: it broadcasts; the check holds on each rank alike
            refuse_link(Path(log_dir) / self.config_filename, "a config")
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            root.mkdir(parents=True, exist_ok=True)
            refuse_link(root / "config.yaml", "a config")
            self.parser.save(self.config, root / "config.yaml", skip_none=False, overwrite=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["phi3lit_config"] = flat_config(self.config)  # what a resume is compared against

    def on_fit_start(self, trainer, pl_module) -> None:
        scalar = (int, float, str, bool)
        flat = {k: v if isinstance(v, scalar) else str(v) for k, v in vars(self.config.as_flat()).items()}
        trainable, total = pl_module.param_counts()
        lora = pl_module.lora
        flat |= {
            "lora/r": lora.r, "lora/alpha": lora.alpha, "lora/targets": ",".join(lora.targets),
            "lora/trainable_params": trainable, "lora/total_params": total,
        }  # fmt: skip
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                if trainer.is_global_zero:  # other ranks hold a stand-in experiment that writes nothing
                    log_hparams_to_tensorboard(logger, flat)
            else:  # CSV, W&B, MLflow, ...: the parameters; the hp/* results arrive as metrics at the end of fit
                logger.log_hyperparams(flat)


HP_METRICS = ("hp/val_loss", "hp/val_ppl", "hp/tokens_per_sec")  # logged by TrainMonitor at the end of fit


def log_hparams_to_tensorboard(logger, params: dict) -> None:
    """TensorBoard's HPARAMS tab: the parameters and the names of the hp/* metrics, with no values yet.

    Lightning's own `log_hyperparams(params, metrics)` writes the metrics as scalars at step 0, so every hp/*
    curve would start with a made-up 0; declaring their names is all the HPARAMS tab needs to show them.
    """
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(params, dict.fromkeys(HP_METRICS, 0.0)):
        logger.experiment.file_writer.add_summary(summary)


class Phi3LitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SaveAdapter, "adapter")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(TrainMonitor, "monitor")
        parser.add_lightning_class_args(SampleReplies, "samples")
        parser.add_lightning_class_args(RunGuard, "guard")
        parser.add_lightning_class_args(ProgressLog, "progress")
        # LightningCLI's standard optimizer and schedule keys (`--optimizer AdamW --optimizer.lr 1e-3`), handed to the
        # module as callables, which builds them over the LoRA parameters with a per-step schedule (phi3lit.optim).
        import torch

        parser.add_optimizer_args((torch.optim.Optimizer,), link_to="model.optimizer")
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple, link_to="model.lr_scheduler")
        parser.set_defaults(OPTIM_DEFAULTS)
        # One source of truth for values that data and model share.
        parser.link_arguments("model.pretrained", "data.tokenizer")
        parser.link_arguments("data.max_length", "model.max_length")
        # A fixed checkpoint folder per run, so `--ckpt_path last` finds the previous run's last.ckpt.
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        # No last-v1.ckpt: a run folder holds one run (see runfolder.py), so `last` is always this run's newest.
        defaults = {"checkpoint.save_last": True, "checkpoint.filename": "{step:06d}"}
        # phi3lit prints its own parameter line (trainable LoRA per module, the whole base); Lightning's summary
        # table would list the metric objects and "0 FLOPs" beside it.
        defaults["trainer.enable_model_summary"] = False
        parser.set_defaults({**defaults, "checkpoint.enable_version_counter": False})
        parser.add_argument(
            "--accept_changes",
            type=bool,
            default=False,
            help="resume (--ckpt_path) even though settings that cannot take effect, or that change the base "
            "model or the data mid-run, differ from the checkpoint's (every difference is printed either way)",
        )
        parser.add_argument(
            "--allocator",
            type=Literal["keep", "system"],
            default="keep",
            help="keep: glibc keeps freed memory for reuse instead of re-faulting fresh pages every step "
            "(phi3lit.allocator; faster on CPU, RSS stays at its peak); system: malloc's defaults",
        )

    def before_fit(self) -> None:
        """A resume: `last` means this run folder's checkpoints/last.ckpt, and changed settings are explained."""
        config = self.config.fit
        self.datamodule.accept_changes = config.accept_changes  # the data fingerprint check honours it too
        ckpt_path = config.ckpt_path
        if not ckpt_path:
            return
        if ckpt_path == "last":
            folder = Path(_checkpoint_dir(config.trainer.default_root_dir))
            path = folder / "last.ckpt"
            if not path.is_file():
                # A kill between a step=N.ckpt write and the last.ckpt write leaves only the former: resume from
                # the newest intact one. None at all: a requeued job's first start, or a kill before any save.
                steps = checkpoints_newest_first(folder)
                path = newest_intact(folder)
                if path is None and steps:  # starting over would overwrite them: the user decides what to keep
                    raise CheckpointError(
                        f"--ckpt_path last: {folder} has no last.ckpt and none of its {len(steps)} step checkpoints "
                        f"({', '.join(p.name for p in steps[:3])}{' ...' if len(steps) > 3 else ''}) is intact. "
                        "Move that folder away to start over, or resume from a copy you trust with --ckpt_path FILE"
                    )
                if path is None:
                    rank_zero_info(
                        f"[phi3lit] --ckpt_path last: no {folder / 'last.ckpt'} yet; starting from the beginning"
                    )
                    self.config_init.fit.ckpt_path = None
                    return
                skipped = ", ".join(p.name for p in steps[: steps.index(path)])  # newer ones that failed their check
                rank_zero_info(
                    f"[phi3lit] --ckpt_path last: no last.ckpt in {folder}; resuming from {path.name}, the newest "
                    f"intact checkpoint there{f' (skipped as damaged: {skipped})' if skipped else ''}"
                )
            self.config_init.fit.ckpt_path = str(path)  # never another run's last-vN.ckpt
        for cb in self.trainer.callbacks:
            if isinstance(cb, RunConfig):
                cb.resuming = True
        if ckpt_path in ("best", "hpc", "registry") or not Path(self.config_init.fit.ckpt_path).suffix:
            return
        saved = read_checkpoint(self.config_init.fit.ckpt_path).get("phi3lit_config")
        if saved is None:  # written before phi3lit saved its config in checkpoints
            return
        diffs = resume_diff(saved, flat_config(config))
        if not diffs:
            return
        message = explain(diffs, config.accept_changes)
        refused = any(kind == "refused" for *_, kind in diffs)
        if refused and not config.accept_changes:
            raise CheckpointError(message.removeprefix("[phi3lit] "))
        rank_zero_info(message)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would unpickle the checkpoint here to copy its hyper-parameters over the config. In phi3lit
        # the config is the source of truth (a LoRA mismatch is reported on load), so only check it is readable.
        if self.config.get("subcommand"):
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and Path(ckpt_path).suffix:
                read_checkpoint(ckpt_path)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_values(config)
        if "weights_only" in config:  # AtomicCheckpointIO loads so whatever it is told; FSDP/DeepSpeed's IO is told
            config.weights_only = True
        check_strategy(config)  # config errors first: they hold on any machine
        check_devices(config)
        if config.allocator == "keep":  # before the model's weights are allocated
            keep_freed_memory()
        note = carried_over_note(config.get("optimizer")) if self.subcommand == "fit" else None
        if note:
            rank_zero_info(note)
        if self.subcommand == "fit":  # before any logger or callback creates folders in it
            root = Path(config.trainer.default_root_dir or os.getcwd())
            before = folder_entries(root)  # a fit that fails before training leaves the folder as it was
            check_writable(root, config.guard.min_free_mb)
            lock_run_folder(root, before)
            check_not_mixing(root, resuming=bool(config.ckpt_path))
            # What killed fits left mid-write (`last.ckpt.tmp-<pid>`, `.adapter.tmp-<pid>/`): never read, in the way.
            stale = remove_stale_temps(root / "checkpoints", root / config.adapter.dirname)
            if stale:
                rank_zero_info(f"[phi3lit] removed what killed runs left mid-write: {', '.join(stale)}")
            if config.trainer.fast_dev_run:  # a check: Lightning's ModelCheckpoint would still write last.ckpt
                config.checkpoint.save_last = False
        if config.trainer.enable_progress_bar is None and not sys.stdout.isatty():
            config.trainer.enable_progress_bar = False  # a bar redrawn into a log file is noise: ProgressLog's lines
        callbacks = config.trainer.callbacks or []
        own_bar = any(_is_progress_bar(getattr(c, "class_path", None)) for c in callbacks)
        if config.trainer.enable_progress_bar is not False and not own_bar:  # steps of max_steps, not epochs
            bar = Namespace(class_path="phi3lit.progress.StepProgressBar", init_args=Namespace())
            config.trainer.callbacks = [*callbacks, bar]
        # Checkpoint files written atomically (a kill mid-save never leaves a partial last.ckpt). FSDP and DeepSpeed
        # write their own sharded checkpoints, so they keep their own IO.
        strategy = str(config.trainer.strategy).lower()
        if "fsdp" not in strategy and "deepspeed" not in strategy:
            io = Namespace(class_path="phi3lit.checkpoint.AtomicCheckpointIO", init_args=Namespace())
            plugins = config.trainer.plugins
            plugins = [] if plugins is None else plugins if isinstance(plugins, list) else [plugins]
            config.trainer.plugins = [*plugins, io]
        # TensorBoard in the run folder by default (Lightning's default would be version_N folders).
        trainer = config.trainer
        if trainer.logger in (None, True):
            root = trainer.default_root_dir or os.getcwd()
            trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=root, name="tb", version="", default_hp_metric=False),
            )


def _is_progress_bar(class_path: str | None) -> bool:
    """Whether a callback given by class path is a progress bar (then phi3lit adds none of its own)."""
    import importlib

    from lightning.pytorch.callbacks.progress import ProgressBar

    module, _, name = (class_path or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        return False
    return isinstance(cls, type) and issubclass(cls, ProgressBar)
