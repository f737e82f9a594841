"""Callbacks: export the trained adapter in peft format, write `predict` replies to JSONL.

LoRA-only checkpoints are the module's own business (`Phi3LoRA.on_save_checkpoint`), so Lightning's
stock `ModelCheckpoint` writes them; `fit --ckpt_path last` finds `<run dir>/checkpoints/last.ckpt`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class SaveAdapter(L.Callback):
    def __init__(self, dirname: str = "adapter"):
        """
        Args:
            dirname: folder under `trainer.default_root_dir` that receives the peft adapter
                (`adapter_config.json`, `adapter_model.safetensors`) and the tokenizer at the end of `fit`.
        """
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        out = Path(trainer.default_root_dir) / self.dirname
        pl_module.model.save_pretrained(out)
        pl_module.tokenizer.save_pretrained(out)
        rank_zero_info(f"[phi3lit] adapter saved to {out} (load with peft.PeftModel.from_pretrained(base, path))")


class PredictionWriter(BasePredictionWriter):
    def __init__(self, filename: str = "predictions.jsonl"):
        """
        Args:
            filename: file under `trainer.default_root_dir` for `predict`: each row is the prompt's
                `messages` plus the generated `reply`.
        """
        super().__init__(write_interval="batch")
        self.filename = filename

    def on_predict_start(self, trainer, pl_module) -> None:
        self.path = Path(trainer.default_root_dir) / self.filename
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with open(self.path, "a") as f:
            for messages, reply in zip(batch["messages"], prediction, strict=True):
                f.write(json.dumps({"messages": messages, "reply": reply}) + "\n")
            f.flush()
            os.fsync(f.fileno())
