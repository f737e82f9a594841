"""LoRA's forward and backward as one autograd Function: the update lands in the base matmul's output buffer.

peft computes an adapted Linear as `base(x) + lora_B(lora_A(dropout(x))) * scaling`. Each step of that
expression makes a full `tokens x out` tensor (B's output, its scaled copy, the sum), and F.dropout draws a
float mask and writes a scaled copy of x. For a LoRA of rank r the matmuls of the update are small (r columns),
so on a CPU these extra memory passes, not the FLOPs, are what LoRA costs. With keep mask m (probability 1 - p),
s_d = 1 / (1 - p) and c = scaling * s_d:

    a = (x * m) A^T                            tokens x r
    y = x W^T + b + c * a B^T                  one addmm into the base output: no tokens x out temporaries
    u = g B                                    tokens x r, g = dL/dy
    dL/dB = c * g^T a,  dL/dA = c * u^T (x * m),  dL/dx = g W + c * (u A) * m

which is peft's expression term by term (the same products, scaled at the small end), so results equal peft's
to float rounding (tested against it, forward and gradients, with the same mask). The mask is kept as bools and
drawn from 31 random bits per element (`keep_mask`): each element is kept with probability 1 - p to within 2^-31,
as F.dropout keeps it, at a fraction of `bernoulli_`'s cost on a CPU. Saved for backward: x * m (which peft's
dropout output also is, up to s_d), the mask and a, as peft saves them.

`FusedLoraLinear` is peft's `lora.Linear` with this forward for the plain case: one active adapter, no
DoRA/variant, a plain `nn.Linear` base, equal dtypes, no autocast. Everything else (merged or disabled adapters,
mixed batches, bf16-mixed autocast, quantized bases) runs peft's own forward. The class keeps peft's type, so
saving, merging and `PeftModel` behave as before.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn

DROP_BITS = 31  # `random_()` on int32 draws uniformly from [0, 2^31): p is honoured to 2^-31


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bools, each True with probability 1 - p independently: F.dropout's keep mask, drawn from raw bits.

    On a CPU, comparing 31-bit random integers with a threshold is the same Bernoulli(1 - p) as `bernoulli_`, in
    less time: with the masked copy, 3.5 ms against F.dropout's 5.8 for 4096 x 384 (experiments/bench/levers.py).
    Elsewhere (CUDA) `bernoulli_` is already cheap and used as is.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)
    bits = torch.empty(shape, dtype=torch.int32, device=device).random_()
    return bits >= round(p * 2**DROP_BITS)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        mask = keep_mask(x.shape, p, x.device) if p > 0 else None
        dropped = x * mask if mask is not None else x
        c = scaling / (1.0 - p)
        a = dropped @ lora_a.T
        y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
        y.addmm_(a, lora_b.T, alpha=c)
        ctx.save_for_backward(weight, lora_a, lora_b, dropped, a, mask)
        ctx.c, ctx.shape = c, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight, lora_a, lora_b, dropped, a, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        u = g @ lora_b  # tokens x r
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            through = u @ lora_a  # the update's path back to x, masked as in forward
            if mask is not None:
                through.mul_(mask)
            grad_x = torch.addmm(through, g, weight, beta=ctx.c).view(ctx.shape)  # g W + c * through
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_a = (u.T @ dropped).mul_(ctx.c)
        if ctx.needs_input_grad[4]:
            grad_b = (g.T @ a).mul_(ctx.c)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


class FusedLoraLinear(PeftLinear):
    """peft's LoRA Linear whose plain training/inference case runs `_LoraLinear` (see the module docstring)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._fusable(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base, dropout = self.base_layer, self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
        return _LoraLinear.apply(
            x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
            float(self.scaling[adapter]), p,
        )  # fmt: skip

    def _fusable(self, x: torch.Tensor, args, kwargs) -> str | None:
        """The one active adapter when the fused path computes exactly what peft would; None otherwise."""
        if args or kwargs or self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        base = self.base_layer
        if len(active) != 1 or active[0] in self.lora_variant or type(base) is not nn.Linear:
            return None
        if base.weight.requires_grad:  # the base trains too: not LoRA's case, leave it to peft
            return None
        adapter = active[0]
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        if lora_a.bias is not None or lora_b.bias is not None:
            return None
        dtypes = {x.dtype, base.weight.dtype, lora_a.weight.dtype, lora_b.weight.dtype}
        if len(dtypes) != 1 or torch.is_autocast_enabled(x.device.type):
            return None
        dropout = self.lora_dropout[adapter]
        if not isinstance(dropout, nn.Dropout | nn.Identity):
            return None
        return adapter


def fuse_lora_layers(model: nn.Module) -> int:
    """Give every peft `lora.Linear` of `model` the fused forward (in place); returns how many it changed."""
    changed = 0
    for module in model.modules():
        if type(module) is PeftLinear:
            module.__class__ = FusedLoraLinear
            changed += 1
    return changed
