"""Callbacks that write what a run produces: the peft adapter at the end of fit, `predict` output, and sample
replies at every validation. The others live with their concern: `monitor.py` (throughput, MFU, memory, curves),
`progress.py` (progress lines and bar), `runguard.py` (signals, final checkpoint, free space).

LoRA-only checkpoints are the module's own business (`Phi3LoRA.on_save_checkpoint`), so Lightning's
stock `ModelCheckpoint` writes them; `fit --ckpt_path last` finds `<run dir>/checkpoints/last.ckpt`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from safetensors import SafetensorError

from phi3lit.clients import format_report
from phi3lit.errors import EnvironmentProblem
from phi3lit.export import finish_adapter_folder
from phi3lit.monitor import tensorboard_logger
from phi3lit.runguard import was_preempted


class SaveAdapter(L.Callback):
    def __init__(self, dirname: str = "adapter"):
        """
        Args:
            dirname: folder under `trainer.default_root_dir` that receives the peft adapter
                (`adapter_config.json`, `adapter_model.safetensors`) and the tokenizer at the end of `fit`.
        """
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        preempted = was_preempted(trainer)
        sharded = isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy)
        if sharded:  # the final last.ckpt (RunGuard.on_train_end) was gathered by every rank: wait for it
            trainer.strategy.barrier()
        if not trainer.is_global_zero or preempted or trainer.fast_dev_run:  # unfinished, or only a check
            return
        out = Path(trainer.default_root_dir) / self.dirname
        if sharded:
            # Reading a sharded model's state on rank 0 alone would wait forever for the other ranks, so the adapter
            # is exported from the full checkpoint instead (the same code as `python -m phi3lit export`).
            from phi3lit.export import export

            ckpt = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
            export(ckpt=str(ckpt), out=str(out))
            rank_zero_info(f"[phi3lit] adapter exported from {ckpt} to {out}")
            return
        # Written whole into a temporary folder, then swapped in: a full disk or a kill mid-save leaves the previous
        # adapter (or none), never a folder with a 0-byte file in it.
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            _remove(tmp)
            tmp.mkdir()  # made here, so never a link planted at the name: the adapter is written where it says
            pl_module.model.save_pretrained(tmp)
            # The base's own tokenizer files, its public name, a model card saying which clients take it, 0644 files.
            datamodule = trainer.datamodule
            facts = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
            if datamodule is not None:
                facts["datamodule_hyper_parameters"] = dict(datamodule.hparams)
            facts["phi3lit"] = {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}}
            report = finish_adapter_folder(tmp, pl_module, checkpoint=facts)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                out.rename(old)
                tmp.rename(out)
                _remove(old)  # a link the user put at `out` is removed as a link, its target left alone
            else:
                tmp.rename(out)
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk in its own error type
            _remove(tmp, ignore_errors=True)
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


def _remove(path: Path, ignore_errors: bool = False) -> None:
    """Remove a folder phi3lit made, or a link (never what it points to)."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except OSError:
        if not ignore_errors:
            raise


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
        from phi3lit.generate import generate_replies

        replies = generate_replies(pl_module.model, pl_module.tokenizer, self.conversations, **self.kw)
        rows = ["| prompt | reply |", "| --- | --- |"]
        for conv, reply in zip(self.conversations, replies, strict=True):
            cell = lambda t: t.replace("|", "\\|").replace("\n", "<br>")
            rows.append(f"| {cell(conv[-1]['content'])} | {cell(reply)} |")
        tensorboard = tensorboard_logger(trainer)
        if tensorboard is not None:
            tensorboard.experiment.add_text("samples", "\n".join(rows), global_step=trainer.global_step)
