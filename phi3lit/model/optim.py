"""The default optimizer and schedule, and how a config swaps them.

`optimizer:` and `lr_scheduler:` are LightningCLI's own keys (`--optimizer AdamW --optimizer.lr 1e-3`, or any
`torch.optim` optimizer and scheduler by class path); the CLI links them into `Phi3LoRA(optimizer=...,
lr_scheduler=...)` as callables, so the module builds them over its trainable parameters and steps the schedule
per optimizer step. The defaults (`DEFAULTS`, shown by `--print_config`) are phi3lit's recipe:

* fused AdamW: one kernel for the whole update, and it honours `found_inf`, which is how a NaN/inf step is skipped
  on the device without a host sync (see `phi3lit.model.guard`);
* `WarmupCosine`: linear warmup from 0, then cosine decay to `min_lr_ratio` of the peak on the last step. The
  Phi-3 model card's recipe is warmup_ratio 0.2 and decay to 0.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

from phi3lit.errors import ConfigError

DEFAULTS = {
    "optimizer": {
        "class_path": "torch.optim.AdamW",
        # torch's AdamW decays by 0.01 by default; LoRA recipes (the paper, the model card) use none.
        "init_args": {"lr": 2e-4, "betas": [0.9, 0.999], "weight_decay": 0.0, "fused": True},
    },
    "lr_scheduler": {
        "class_path": "phi3lit.model.optim.WarmupCosine",
        "init_args": {"warmup_steps": 0, "warmup_ratio": 0.0, "min_lr_ratio": 0.1},
    },
}


class WarmupCosine(LRScheduler):
    """Linear warmup from 0 to the optimizer's lr, then cosine decay to `lr * min_lr_ratio` on the last step.

    The number of steps is the trainer's (`max_steps`, or the epochs' optimizer steps): `Phi3LoRA` sets
    `total_steps` when it builds the schedule, unless given here.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        min_lr_ratio: float = 0.1,
        total_steps: int | None = None,
        last_epoch: int = -1,
    ):
        """
        Args:
            warmup_steps: linear warmup steps from 0 to the optimizer's lr.
            warmup_ratio: warmup as a share of all optimizer steps (the model card uses 0.2); the larger wins.
            min_lr_ratio: cosine decay ends at `lr * min_lr_ratio` on the last step.
            total_steps: optimizer steps of the run; None: the trainer's.
        """
        for key, value in (("warmup_ratio", warmup_ratio), ("min_lr_ratio", min_lr_ratio)):
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"lr_scheduler.init_args.{key} must be a finite number >= 0, got {value}")
        if warmup_steps < 0:
            raise ConfigError(f"lr_scheduler.init_args.warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps, self.warmup_ratio, self.min_lr_ratio = warmup_steps, warmup_ratio, min_lr_ratio
        self.total_steps = total_steps
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total: int) -> None:
        """The run's optimizer steps, once the trainer knows them; the current lr follows."""
        self.total_steps = max(1, int(total))
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict) -> None:
        """Lightning restores the optimizer first, with the lr the saved run's schedule had set on its last step;
        the lr of the resumed step is this schedule's (a larger `trainer.max_steps` stretches the cosine)."""
        super().load_state_dict(state_dict)
        if self.total_steps is not None:
            self.set_total_steps(self.total_steps)

    def state_dict(self) -> dict:
        # Not the run's length: a resume with a larger trainer.max_steps follows the schedule of the new length
        # (the trainer's, set again at every start), as one uninterrupted run of that length would.
        return {k: v for k, v in super().state_dict().items() if k != "total_steps"}

    def factor(self, step: int) -> float:
        total = self.total_steps or 1
        warmup = max(self.warmup_steps, int(self.warmup_ratio * total))
        if step < warmup:
            return (step + 1) / (warmup + 1)
        # The last step (total - 1) is where the decay ends: `min_lr_ratio` is the lr of a step the run takes.
        progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base * self.factor(max(0, self.last_epoch)) for base in self.base_lrs]


def carried_over_note(optimizer) -> str | None:
    """A line for an optimizer other than the default that runs with `fused=True` it was likely not asked for.

    When `--optimizer` changes the class, jsonargparse keeps the init_args the new class shares with the one before
    it, so the default AdamW's `fused: true` applies to SGD (or Adam, ...) too. Fused kernels are correct, and phi3lit's
    non-finite guard works with both, so this is said, not changed.
    """
    if optimizer is None or optimizer.class_path == DEFAULTS["optimizer"]["class_path"]:
        return None
    if not (optimizer.get("init_args") or {}).get("fused"):
        return None
    return (
        f"[phi3lit] optimizer {optimizer.class_path} runs with fused=True: settings a new --optimizer class shares "
        "with the one before it (lr, weight_decay, fused, ...) carry over; --optimizer.fused null turns it off"
    )


def default_optimizer(params) -> torch.optim.Optimizer:
    """`DEFAULTS["optimizer"]`, for `Phi3LoRA` built in Python without the CLI."""
    return torch.optim.AdamW(params, **{**DEFAULTS["optimizer"]["init_args"], "betas": (0.9, 0.999)})


def default_scheduler(optimizer: torch.optim.Optimizer) -> WarmupCosine:
    """`DEFAULTS["lr_scheduler"]`, for `Phi3LoRA` built in Python without the CLI."""
    return WarmupCosine(optimizer, **DEFAULTS["lr_scheduler"]["init_args"])
