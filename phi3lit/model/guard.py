"""The non-finite guard: a NaN/inf step is never applied, and training stops (or goes on) with the step's examples.

Reading a device flag every step would cost a host sync per step. Instead `record` runs at each optimizer step,
before the update: it computes "loss or gradient norm non-finite" on the device, summed over ranks (so where
gradients are sharded, every rank skips the same steps), and hands it to the optimizer as `found_inf`. Fused AdamW
leaves weights and state untouched where `found_inf` is 1 (as under GradScaler), so the bad step is skipped on the
device. An optimizer without a fused kernel cannot take `found_inf`: for it the flag is read at once (one host sync
per step) and a bad step's gradients are dropped, which torch optimizers skip entirely. `check` reads the flags of
all steps since the last check in one sync, at the steps where Lightning reads the logged metrics anyway
(`trainer.log_every_n_steps`) and at the end; then it raises `NonFiniteError` naming the step and its examples
(`on_nonfinite: stop`), or counts and logs a skipped step (`skip`, up to `max_skipped`).

Under fp16 GradScaler an overflowed gradient is routine (the scaler skips the step and lowers the scale, setting
`found_inf` itself), so only a non-finite loss counts as a bad step there.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from phi3lit.errors import NonFiniteError
from phi3lit.lightning_compat import skip_step_if


class NonFiniteGuard:
    def __init__(self, on_nonfinite: Literal["stop", "skip"] = "stop", max_skipped: int = 10):
        self.on_nonfinite, self.max_skipped = on_nonfinite, max_skipped
        self.skipped = 0
        self._unchecked: list[tuple] = []  # (step, non-finite flag, loss, grad norm, sources) not yet read

    def record(self, step: int, loss, norm, sources: list[str], optimizer, strategy, scaled: bool) -> None:
        """Flag this optimizer step on the device (no host sync) and make the optimizer skip it if bad."""
        checked = loss if scaled else loss + norm
        bad = strategy.reduce((~torch.isfinite(checked)).float(), reduce_op="sum") > 0
        if not scaled:  # GradScaler.step sets found_inf itself
            if optimizer.defaults.get("fused"):  # fused Adam/AdamW/SGD skip on the device where found_inf is 1
                skip_step_if(optimizer, bad)
            elif bad.item():  # other optimizers cannot: one host sync per step, and no gradient means no update
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
        self._unchecked.append((step, bad, loss, norm, sources))

    @property
    def pending(self) -> bool:
        return bool(self._unchecked)

    def check(self, log, last_step: int) -> None:
        """Read the flags of the steps since the last check (one host sync for all of them); `log(name, value)`
        records the count of skipped steps."""
        pending, self._unchecked = self._unchecked, []
        flags = torch.stack([bad for _, bad, *_ in pending]).tolist()
        for (step, _, loss, norm, sources), bad in zip(pending, flags, strict=True):
            if bad:
                self._bad_step(step, loss, norm, sources, log, last_step)

    def _bad_step(self, step: int, loss, norm, sources: list[str], log, last_step: int) -> None:
        sources = sorted(set(sources))
        more = " ..." if len(sources) > 8 else ""
        where = f"; the step's examples: {', '.join(sources[:8])}{more}" if sources else ""
        self.skipped += 1
        if self.on_nonfinite == "skip" and self.skipped <= self.max_skipped:
            log("train/skipped_steps", float(self.skipped))
            rank_zero_info(f"[phi3lit] skipped step {step}: loss {loss.item()}, grad norm {norm.item()}{where}")
            return
        raise NonFiniteError(
            f"non-finite loss ({loss.item()}) or gradient norm ({norm.item()}) at optimizer step {step}{where}. "
            "That step was not applied (nor any later NaN/inf one), so every checkpoint in checkpoints/ holds "
            f"finite weights; the check runs every trainer.log_every_n_steps, so training stopped at step "
            f"{last_step}. Lower optimizer.init_args.lr, check the data, or set model.on_nonfinite=skip."
        )
