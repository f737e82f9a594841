"""Observation-only callbacks for tests that drive `python -m phi3lit fit` as a user does.

A test adds one with `--trainer.callbacks+={"class_path": "probes.X", "init_args": {"out": FILE}}` (with `tests/`
on PYTHONPATH), exactly as a user adds their own callback. A probe never changes training state: it only reads
what the run did and appends one JSON object per event to `out`, which the test then reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


def probe_arg(cls: str, out: Path, **init_args) -> list[str]:
    """The CLI words that add probe `cls` writing to `out`."""
    spec = {"class_path": f"probes.{cls}", "init_args": {"out": str(out), **init_args}}
    return [f"--trainer.callbacks+={json.dumps(spec)}"]


def read_probe(out: Path) -> list[dict]:
    return [json.loads(line) for line in Path(out).read_text().splitlines()] if Path(out).exists() else []


class _Probe(L.Callback):
    def __init__(self, out: str):
        self.out = out

    def write(self, trainer, **record) -> None:
        if trainer.is_global_zero or record.get("all_ranks"):
            with open(self.out, "a") as f:
                f.write(json.dumps(record) + "\n")


class RecordRows(_Probe):
    """The conversations (`sources`: file:line) each training and validation micro-batch held, per rank."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        record = {"stage": "train", "step": trainer.global_step, "rank": trainer.global_rank, "all_ranks": True}
        self.write(trainer, **record, sources=list(batch.get("sources", [])))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        record = {"stage": "val", "step": trainer.global_step, "rank": trainer.global_rank, "all_ranks": True}
        self.write(trainer, **record, sources=list(batch.get("sources", [])))


class TrainingStepFacts(_Probe):
    """Per micro-batch: bytes autograd saved for backward, checkpoint recomputations, dtypes, post-clip norm.

    Saved bytes are counted with `saved_tensors_hooks` around the whole micro-batch: under non-reentrant
    activation checkpointing the checkpointed layers save only their inputs, so the count drops. A recompute
    is counted for every forward of a decoder layer that runs during backward.
    """

    def on_fit_start(self, trainer, pl_module) -> None:
        self.saved = 0
        self.in_backward = False
        self.layer_forwards = {"forward": 0, "backward": 0}
        self.dtypes: set[str] = set()
        self.peft_forwards = 0  # calls of peft's own LoRA forward (the fused layer never calls its base_layer)
        base = pl_module.model.get_base_model()
        for layer in base.model.layers:
            # transformers' checkpointing replays the layer's `forward` (not `__call__`), so count a submodule's
            # calls: they run once in the forward, and once more in backward for every recomputed layer.
            layer.self_attn.register_forward_hook(self._on_layer)
            layer.self_attn.qkv_proj.register_forward_hook(self._on_matmul)
            layer.self_attn.qkv_proj.base_layer.register_forward_hook(self._on_base_layer)

    def _on_layer(self, module, args, output) -> None:
        self.layer_forwards["backward" if self.in_backward else "forward"] += 1

    def _on_matmul(self, module, args, output) -> None:
        # The dtype the frozen matmuls compute in (the adapted layer returns the base matmul's dtype, on the fused
        # path and on peft's): autocast's or the weights'; a bitsandbytes 4-bit layer casts its input to
        # `compute_dtype` and its output back, so there the compute dtype is the layer's setting.
        compute = getattr(module.base_layer, "compute_dtype", None)
        self.dtypes.add(str(compute if compute is not None else output.dtype))

    def _on_base_layer(self, module, args, output) -> None:
        self.peft_forwards += 1

    def _pack(self, t: torch.Tensor):
        self.saved += t.numel() * t.element_size()
        return t

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.in_backward = True

    def on_after_backward(self, trainer, pl_module) -> None:
        self.in_backward = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._hooks.__exit__(None, None, None)
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None
        self.write(
            trainer,
            step=trainer.global_step,
            saved_bytes=self.saved,
            layer_forwards=dict(self.layer_forwards),
            matmul_dtypes=sorted(self.dtypes),
            peft_forwards=self.peft_forwards,
            base_dtypes=sorted({str(p.dtype) for p in pl_module.parameters() if not p.requires_grad}),
            lora_dtypes=sorted({str(p.dtype) for p in pl_module.parameters() if p.requires_grad}),
            grad_norm_after_clip=norm,
            training_mode=pl_module.model.training,
        )
        self.saved = self.peft_forwards = 0
        self.layer_forwards = {"forward": 0, "backward": 0}
        self.dtypes = set()


class SlowValidation(_Probe):
    """Makes every validation batch take `seconds` longer (a large validation set, seen from the clock)."""

    def __init__(self, out: str, seconds: float = 1.0):
        super().__init__(out)
        self.seconds = seconds

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        import time

        time.sleep(self.seconds)


class OptimizerFacts(_Probe):
    """Per optimizer step: the optimizer's class, its lr and other group settings, the scheduler's class."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        group = optimizer.param_groups[0]
        scheduler = trainer.lr_scheduler_configs[0] if trainer.lr_scheduler_configs else None
        self.write(
            trainer,
            step=trainer.global_step,
            optimizer=type(optimizer).__name__,
            lr=group["lr"],
            weight_decay=group.get("weight_decay"),
            momentum=group.get("momentum"),
            fused=group.get("fused"),
            params=sum(p.numel() for p in group["params"]),
            scheduler=type(scheduler.scheduler).__name__ if scheduler else None,
            interval=scheduler.interval if scheduler else None,
        )


class TrainerFacts(_Probe):
    """At the start of fit: the strategy's checkpoint IO and the callbacks' classes."""

    def on_fit_start(self, trainer, pl_module) -> None:
        io = trainer.strategy.checkpoint_io
        self.write(trainer, checkpoint_io=f"{type(io).__module__}.{type(io).__name__}")


class SignalAt(_Probe):
    """Preemption at a known step: sends `signal` to this process during the optimizer step that makes
    `trainer.global_step` equal `step` (a real signal, handled by phi3lit's RunGuard as a cluster's would be).
    It fires once per process, so a resumed run that starts past `step` is not stopped again."""

    def __init__(self, out: str, step: int, signal: str = "SIGTERM"):
        super().__init__(out)
        self.step, self.signal = step, signal

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step:
            import os
            import signal

            self.write(trainer, sent=self.signal, step=self.step)
            os.kill(os.getpid(), getattr(signal, self.signal))
