"""The peft adapter at the end of fit: `<run>/adapter`, written whole or not at all, in the form clients read.

It is an export (the same files as `python -m phi3lit export`, with the base's tokenizer, its public name and a
model card), so it lives in the export layer; the run layer knows it only as an `AdapterWriter`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from safetensors import SafetensorError

from phi3lit.errors import EnvironmentProblem
from phi3lit.export.clients import format_report
from phi3lit.export.export import finish_adapter_folder
from phi3lit.files import atomic_folder
from phi3lit.run.callbacks import AdapterWriter
from phi3lit.run.preemption import was_preempted


class SaveAdapter(AdapterWriter):
    def __init__(self, dirname: str = "adapter"):
        """
        Args:
            dirname: folder under `trainer.default_root_dir` that receives the peft adapter
                (`adapter_config.json`, `adapter_model.safetensors`) and the tokenizer at the end of `fit`.
        """
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        preempted = was_preempted(trainer)
        sharded = isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy | ModelParallelStrategy)  # FSDP2 too
        if sharded:  # the final last.ckpt (RunGuard.on_train_end) was gathered by every rank: wait for it
            trainer.strategy.barrier()
        if not trainer.is_global_zero or preempted or trainer.fast_dev_run:  # unfinished, or only a check
            return
        out = Path(trainer.default_root_dir) / self.dirname
        if sharded:
            # Reading a sharded model's state on rank 0 alone would wait forever for the other ranks, so the adapter
            # is exported from the full checkpoint instead (the same code as `python -m phi3lit export`).
            from phi3lit.export.export import export

            ckpt = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
            export(ckpt=str(ckpt), out=str(out))
            rank_zero_info(f"[phi3lit] adapter exported from {ckpt} to {out}")
            return
        # Written whole into a temporary folder, then swapped in (phi3lit.files): a full disk or a kill mid-save
        # leaves the previous adapter (or none), never a folder with a 0-byte file in it.
        try:
            with atomic_folder(out) as tmp:
                pl_module.model.save_pretrained(tmp)
                # The base's own tokenizer files, its public name, a model card saying which clients take it, 0644.
                datamodule = trainer.datamodule
                facts = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
                if datamodule is not None:
                    facts["datamodule_hyper_parameters"] = dict(datamodule.hparams)
                metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
                facts["phi3lit"] = {"metrics": metrics}
                report = finish_adapter_folder(tmp, pl_module, checkpoint=facts)
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk in its own error type
            ckpt = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else trainer.default_root_dir
            why = getattr(e, "strerror", None) or e
            last = Path(ckpt) / "last.ckpt"  # quoted: the command is for copying into a shell
            raise EnvironmentProblem(
                f"{out}: could not write the adapter ({why}); nothing partial was left there. The final "
                f"weights are in {last}: free space, then python -m phi3lit export --ckpt "
                f"{shlex.quote(str(last))} --out {shlex.quote(str(out))}"
            ) from None
        rank_zero_info(f"[phi3lit] adapter saved to {out} (load with peft.PeftModel.from_pretrained(base, path))")
        rank_zero_info(format_report(report, out))  # which clients take it as it is, and when to `export` first
