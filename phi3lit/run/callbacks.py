"""Callbacks that write what a run produces: `predict` output, and sample replies at every validation. The others
live with their concern: `monitor.py` (throughput, MFU, memory, curves), `progress.py` (progress lines and bar),
`preemption.py` (signals, final checkpoint, free space), `phi3lit.export.callback` (the adapter at the end of fit).

LoRA-only checkpoints are the module's own business (`Phi3LoRA.on_save_checkpoint`), so Lightning's
stock `ModelCheckpoint` writes them; `fit --ckpt_path last` finds `<run dir>/checkpoints/last.ckpt`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from phi3lit.run.monitor import tensorboard_logger


class AdapterWriter(L.Callback):
    """A callback that writes the run's adapter to `<run>/<dirname>` at the end of fit (phi3lit.export.callback's
    SaveAdapter): the run layer knows where it goes (the end-of-fit summary says so), not how it is written."""

    dirname: str = "adapter"


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

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.conversations or trainer.sanity_checking or not trainer.is_global_zero:
            return
        from phi3lit.model.generate import generate_replies

        replies = generate_replies(pl_module.model, pl_module.tokenizer, self.conversations, **self.kw)
        rows = ["| prompt | reply |", "| --- | --- |"]
        for conv, reply in zip(self.conversations, replies, strict=True):
            cell = lambda t: t.replace("|", "\\|").replace("\n", "<br>")
            rows.append(f"| {cell(conv[-1]['content'])} | {cell(reply)} |")
        tensorboard = tensorboard_logger(trainer)
        if tensorboard is not None:
            tensorboard.experiment.add_text("samples", "\n".join(rows), global_step=trainer.global_step)
