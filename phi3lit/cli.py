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

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeTuple, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from phi3lit.checkpoint import checkpoints_newest_first, newest_intact, read_checkpoint, remove_stale_temps
from phi3lit.errors import CheckpointError
from phi3lit.export.callback import SaveAdapter
from phi3lit.model.optim import DEFAULTS as OPTIM_DEFAULTS
from phi3lit.model.optim import carried_over_note
from phi3lit.run.allocator import keep_freed_memory
from phi3lit.run.callbacks import PredictionWriter, SampleReplies
from phi3lit.run.checks import check_devices, check_positions, check_strategy, check_values
from phi3lit.run.monitor import TrainMonitor
from phi3lit.run.preemption import RunGuard, check_writable
from phi3lit.run.progress import ProgressLog
from phi3lit.run.resume import explain, flat_config, resume_diff
from phi3lit.run.runfolder import check_not_mixing, folder_entries, lock_run_folder, refuse_link


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
        # module as callables, which builds them over the LoRA parameters with a per-step schedule
        # (phi3lit.model.optim).
        import torch

        parser.add_optimizer_args((torch.optim.Optimizer,), link_to="model.optimizer")
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple, link_to="model.lr_scheduler")
        parser.set_defaults(OPTIM_DEFAULTS)
        # One source of truth for values that data and model share.
        parser.link_arguments("model.pretrained", "data.tokenizer")
        # A fixed checkpoint folder per run, so `--ckpt_path last` finds the previous run's last.ckpt.
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        # No last-v1.ckpt: a run folder holds one run (see runfolder.py), so `last` is always this run's newest.
        defaults = {"checkpoint.save_last": True, "checkpoint.filename": "{step:06d}"}
        # phi3lit prints its own parameter line (trainable LoRA per module, the whole base); Lightning's summary
        # table would list the metric objects and "0 FLOPs" beside it.
        defaults["trainer.enable_model_summary"] = False
        parser.set_defaults({**defaults, "checkpoint.enable_version_counter": False})
        # The Trainer phi3lit runs, as parser defaults so that `--print_config` prints it and running the printed
        # config gives the same run: TensorBoard in the run folder (Lightning's default would be version_N folders),
        # the progress bar in optimizer steps of the whole run, and checkpoint files written atomically (a kill
        # mid-save never leaves a partial last.ckpt). Each can be replaced or switched off in the config.
        parser.set_defaults(
            {
                "trainer.logger": {"class_path": "phi3lit.run.monitor.RunTensorBoard"},
                "trainer.callbacks": [{"class_path": "phi3lit.run.progress.StepProgressBar"}],
                "trainer.plugins": [{"class_path": "phi3lit.checkpoint.AtomicCheckpointIO"}],
            }
        )
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
            "(phi3lit.run.allocator; faster on CPU, RSS stays at its peak); system: malloc's defaults",
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
        checkpoint = read_checkpoint(self.config_init.fit.ckpt_path)
        check_optimizer_layout(checkpoint, config, self.config_init.fit.ckpt_path)
        saved = checkpoint.get("phi3lit_config")
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
        check_positions(config)  # both configs in view, before any weights or data are read
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
        logger = config.trainer.logger  # the default RunTensorBoard: `run_dir: null` means the run folder
        if getattr(logger, "class_path", "") == "phi3lit.run.monitor.RunTensorBoard" and not logger.init_args.run_dir:
            logger.init_args.run_dir = config.trainer.default_root_dir or os.getcwd()
        if config.trainer.enable_progress_bar is None and not sys.stdout.isatty():
            config.trainer.enable_progress_bar = False  # a bar redrawn into a log file is noise: ProgressLog's lines
        if config.trainer.enable_progress_bar is False and config.trainer.callbacks:
            # No bar asked for: the default StepProgressBar steps aside (Lightning refuses a bar with the switch off).
            bar = "phi3lit.run.progress.StepProgressBar"
            config.trainer.callbacks = [c for c in config.trainer.callbacks if getattr(c, "class_path", None) != bar]


def check_optimizer_layout(checkpoint: dict, config, path: str) -> None:
    """FSDP2's loader lays a checkpoint's optimizer state over all parameters by position (frozen ones included), as
    an FSDP2 run saved it; a run without FSDP2 keyed it by position over the trainable parameters only, so FSDP2
    would put it on the wrong tensors (a shape error deep in the load). Refused here in one line; the other way
    round (FSDP2 onto one process or DDP) works. Which run wrote it: the config it saved (`phi3lit_config`)."""
    if "modelparallelstrategy" not in str(config.trainer.strategy).lower():
        return
    saved = checkpoint.get("phi3lit_config") or {}
    written = " ".join(str(v) for k, v in saved.items() if k.startswith("trainer.strategy"))
    if saved and "ModelParallelStrategy" not in written:
        raise CheckpointError(
            f"--ckpt_path {path}: written by a run without FSDP2 (its optimizer state is keyed by position over "
            "the trainable parameters), which FSDP2 cannot restore; resume it as it was trained (one process or "
            "DDP), or start the FSDP2 run afresh"
        )


class DataReportCLI(Phi3LitCLI):
    """`phi3lit data`: the fit config, parsed without running, plus which example to show."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--show",
            type=int | Literal["longest", "truncated"],
            default=0,
            help="the example to print with its trained tokens marked: an index, longest or truncated",
        )
        parser.add_argument("--split", type=Literal["train", "val", "test"], default="train", help="which split")


def inspect_config(command: Literal["data", "plan"], args: list[str], description: str) -> str:
    """`data` and `plan`: the fit config parsed (and its model and data built, no weights read), then reported."""
    from phi3lit.data.inspection import describe
    from phi3lit.data.module import ChatDataModule
    from phi3lit.model.module import Phi3LoRA

    cli = (DataReportCLI if command == "data" else Phi3LitCLI)(
        Phi3LoRA,
        ChatDataModule,
        run=False,
        auto_configure_optimizers=False,
        args=args,
        parser_kwargs={"prog": f"phi3lit {command}", "description": description, "exit_on_error": False},
    )
    if command == "data":
        return describe(cli.datamodule, cli.config.split, cli.config.show)
    from phi3lit.tools.plan import plan_from_cli

    return plan_from_cli(cli)


def run_trainer_command(args: list[str] | None) -> None:
    """fit, validate, test, predict: LightningCLI over Phi3LoRA + ChatDataModule (`args` None: sys.argv)."""
    from phi3lit.data.module import ChatDataModule
    from phi3lit.model.module import Phi3LoRA

    Phi3LitCLI(
        Phi3LoRA,
        ChatDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,  # `optimizer:` / `lr_scheduler:` are linked into the module instead
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        parser_kwargs={"prog": "phi3lit", "exit_on_error": False},  # a refused value: one line (main's handler)
    )
