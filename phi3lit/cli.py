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
from phi3lit.checkpoint import read_checkpoint
from phi3lit.checks import check_devices, check_strategy, check_values
from phi3lit.console import quiet
from phi3lit.data import ChatDataModule
from phi3lit.errors import CheckpointError, ConfigError, Phi3litError
from phi3lit.model import Phi3LoRA
from phi3lit.monitor import TrainMonitor
from phi3lit.optim import DEFAULTS as OPTIM_DEFAULTS
from phi3lit.progress import ProgressLog
from phi3lit.resume import explain, flat_config, resume_diff
from phi3lit.runfolder import check_not_mixing, lock_run_folder, release_run_folder
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
                self.parser.save(self.config, root / f"config-resume-{n}.yaml", skip_none=False, overwrite=True)
            return
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            root.mkdir(parents=True, exist_ok=True)
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
            path = Path(_checkpoint_dir(config.trainer.default_root_dir)) / "last.ckpt"
            if not path.is_file():  # a requeued job's first start (or a kill before the first checkpoint)
                rank_zero_info(f"[phi3lit] --ckpt_path last: no {path} yet; starting from the beginning")
                self.config_init.fit.ckpt_path = None
                return
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
        check_strategy(config)  # config errors first: they hold on any machine
        check_devices(config)
        if config.allocator == "keep":  # before the model's weights are allocated
            keep_freed_memory()
        if self.subcommand == "fit":  # before any logger or callback creates folders in it
            root = Path(config.trainer.default_root_dir or os.getcwd())
            check_writable(root, config.guard.min_free_mb)
            lock_run_folder(root)
            check_not_mixing(root, resuming=bool(config.ckpt_path))
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


def main(args: list[str] | None = None) -> None:
    """Every subcommand runs under one handler: the user's input or environment gives one line, no traceback."""
    argv = sys.argv[1:] if args is None else list(args)
    quiet(report_only=bool(argv) and argv[0] in ("plan", "data"))
    try:
        _dispatch(argv, args is None)
    except Exception as e:  # the user's input or environment, not a bug: a message, no traceback
        known = _explained(e)
        if known is None:
            raise
        print(f"phi3lit: {known.kind} error: {known}", file=sys.stderr)
        sys.exit(getattr(known, "exit_code", 2))
    finally:
        release_run_folder()  # a process that runs several fits (tests, notebooks) frees each folder it used


COMMANDS = {  # name: what it does, for the top-level --help
    "fit": "train LoRA adapters (the config's trainer, model and data); writes <run>/adapter at the end",
    "validate": "val loss of a checkpoint or adapter on the validation data",
    "test": "the same on data.test_file",
    "predict": "answer data.predict_file's prompts; writes <run>/predictions.jsonl",
    "data": "what the data becomes: counts, lengths, packing, and an example with its trained tokens marked "
    "(--show N|longest|truncated, --split train|val|test)",
    "plan": "parameter counts and a memory estimate for a config, without weights or a GPU",
    "export": "a checkpoint as a stock peft adapter (fused or split) or a merged model",
    "chat": "talk to an adapter or a merged model in the terminal",
    "ablate": "run a sweep file (experiments/*.yaml) of fit overrides and summarise it",
    "analyze": "what LoRA learned: spectra, subspace similarity and amplification of the saved adapters (CPU, no data)",
    "tiny": "build a tiny random-init Phi-3 of any tokenizer's vocabulary, for offline dry runs",
}


def overview() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items())
    return (
        "usage: phi3lit COMMAND [--config FILE.yaml] [options]   (also: python -m phi3lit COMMAND ...)\n\n"
        "LoRA fine-tuning of Phi-3 with PyTorch Lightning.\n\ncommands:\n"
        f"{rows}\n\n"
        "phi3lit COMMAND --help lists a command's options; fit, validate, test, predict, data and plan take the same\n"
        "config (--print_config shows it resolved). Start offline: phi3lit fit --config configs/tiny.yaml"
    )


def _function_cli(fn, name: str, args: list[str]):
    from jsonargparse import CLI

    return CLI(fn, args=args, as_positional=False, prog=f"phi3lit {name}")


def _data_options(argv: list[str]) -> tuple[list[str], int | str, str]:
    """`data`'s own options, taken out before the fit config is parsed: --show N|longest|truncated, --split."""
    show, split, rest, i = 0, "train", [], 0
    while i < len(argv):
        key, _, value = argv[i].partition("=")
        if key in ("--show", "--split") and argv[0] == "data":
            if not value:
                i += 1
                value = argv[i] if i < len(argv) else ""
            if key == "--split":
                if value not in ("train", "val", "test"):
                    raise ConfigError(f"data --split must be train, val or test, got {value!r}")
                split = value
            elif value in ("longest", "truncated") or value.isdigit():
                show = int(value) if value.isdigit() else value
            else:
                raise ConfigError(f"data --show takes an example index, longest or truncated, got {value!r}")
        else:
            rest.append(argv[i])
        i += 1
    return rest, show, split


def _dispatch(argv: list[str], from_sys_argv: bool) -> None:
    command = argv[0] if argv else None
    if command in (None, "-h", "--help"):
        print(overview())
        return
    if command == "export":
        from phi3lit.export import export

        rest = argv[1:]
        for i, a in enumerate(rest):  # allow the plain flag `--merge` (jsonargparse booleans take a value)
            if a == "--merge" and (i + 1 == len(rest) or rest[i + 1].startswith("--")):
                rest[i] = "--merge=true"
        out = _function_cli(export, "export", rest)
        print(f"[phi3lit] exported to {out}")
        return
    if command == "ablate":
        from phi3lit import ablate

        sys.exit(ablate.main(argv[1:]))
    if command == "analyze":
        from phi3lit import analyze

        sys.exit(analyze.main(argv[1:]))
    if command == "chat":
        from phi3lit.chat import chat

        _function_cli(chat, "chat", argv[1:])
        return
    if command == "tiny":
        from phi3lit.tiny import tiny

        _function_cli(tiny, "tiny", argv[1:])
        return
    if command in ("data", "plan"):  # the fit config, parsed without running: inspect before spending GPU hours
        argv, show, split = _data_options(argv)
        cli = Phi3LitCLI(
            Phi3LoRA,
            ChatDataModule,
            run=False,
            auto_configure_optimizers=False,
            args=argv[1:],
            parser_kwargs={"prog": f"phi3lit {command}", "description": COMMANDS[command]},
        )
        if command == "data":
            from phi3lit.data import describe

            print(describe(cli.datamodule, split, show))
        else:
            from phi3lit.plan import plan_from_cli

            print(plan_from_cli(cli))
        return
    Phi3LitCLI(
        Phi3LoRA,
        ChatDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,  # `optimizer:` / `lr_scheduler:` are linked into the module instead
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        args=None if from_sys_argv else argv,
        parser_kwargs={"prog": "phi3lit"},
    )


def _explained(e: BaseException | None) -> BaseException | None:
    """The phi3lit error behind `e` (jsonargparse and Lightning wrap exceptions in their own)."""
    while e is not None:
        if isinstance(e, Phi3litError):
            return e
        e = e.__cause__ or e.__context__
    return None
