"""The fused LoRA layer against stock peft's forward: same outputs and gradients, same dropout distribution."""

import math

import pytest
import torch
from torch import nn

from phi3lit.model import fused_lora
from phi3lit.model.fused_lora import FusedLoraLinear, fuse_lora_layers, keep_mask


def peft_pair(dropout: float, bias: bool = False, r: int = 4):
    """Two identical peft models (a stock one and a fused one) of a two-layer MLP with trained, non-zero B."""
    from peft import LoraConfig, get_peft_model

    def build():
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(24, 40, bias=bias), nn.SiLU(), nn.Linear(40, 24, bias=bias))
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["0", "2"])
        model = get_peft_model(mlp, config)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give it values so the update is seen
                with torch.no_grad():
                    p.normal_(0, 0.3)
        return model

    stock, fused = build(), build()
    assert fuse_lora_layers(fused) == 2
    return stock, fused


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bias", [False, True])
def test_fused_equals_peft_without_dropout(bias):
    stock, fused = peft_pair(dropout=0.0, bias=bias)
    x = torch.randn(3, 7, 24, requires_grad=True)
    outs = []
    for model in (stock, fused):
        model.train()
        xi = x.detach().clone().requires_grad_()
        y = model(xi)
        (y.square().sum() + y.sum()).backward()
        outs.append((y.detach(), xi.grad, grads(model)))
    (y0, gx0, g0), (y1, gx1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and any("lora_A" in k for k in g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6)


def test_fused_dropout_equals_peft_with_the_same_mask(monkeypatch):
    """The fused layer applies dropout as peft's `dropout(x)` does: zero with the mask, scale by 1 / (1 - p)."""
    p = 0.3
    stock, fused = peft_pair(dropout=p)
    x = torch.randn(5, 24)
    masks = []

    def recording(shape, p_, device):
        masks.append(keep_mask(shape, p_, device))
        return masks[-1]

    monkeypatch.setattr(fused_lora, "keep_mask", recording)
    fused.train()
    xf = x.clone().requires_grad_()
    y = fused(xf)
    y.square().sum().backward()
    assert len(masks) == 2 and all(0 < m.float().mean() < 1 for m in masks)  # both layers dropped something

    # peft's layer with its dropout replaced by the recorded masks (same arithmetic as nn.Dropout's).
    queue = list(masks)

    class Replay(nn.Module):
        def forward(self, inp):
            return inp * queue.pop(0).view(inp.shape) / (1 - p)

    for module in stock.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = Replay()
    stock.train()
    xs = x.clone().requires_grad_()
    ys = stock(xs)
    ys.square().sum().backward()
    torch.testing.assert_close(y, ys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-5, atol=1e-6)
    g_fused, g_stock = grads(fused), grads(stock)
    for k in g_stock:
        torch.testing.assert_close(g_fused[k], g_stock[k], rtol=1e-5, atol=1e-6)


def test_dropout_is_random_in_train_mode_and_off_in_eval():
    _, fused = peft_pair(dropout=0.2)
    x = torch.randn(8, 24)
    fused.train()
    assert not torch.equal(fused(x), fused(x))
    fused.eval()
    assert torch.equal(fused(x), fused(x))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keep_mask_is_bernoulli(p):
    """Keep rate 1 - p within 5 standard errors over 4M draws; neighbours and rows uncorrelated."""
    torch.manual_seed(1)
    mask = keep_mask(torch.Size([2048, 2048]), p, torch.device("cpu")).float()
    n = mask.numel()
    assert abs(mask.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    for a, b in [(mask[:, 1:], mask[:, :-1]), (mask[1:], mask[:-1])]:  # neighbours along and across rows
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(a.numel())


def test_other_cases_fall_back_to_peft():
    """A merged adapter, a disabled one, or autocast: peft's own forward, and the same result as stock peft."""
    stock, fused = peft_pair(dropout=0.0)
    x = torch.randn(4, 24)
    layer = fused.base_model.model[0]
    assert isinstance(layer, FusedLoraLinear)
    with fused.disable_adapter(), stock.disable_adapter():
        torch.testing.assert_close(fused(x), stock(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._fusable(x, (), {}) is None
    fused.merge_adapter()
    assert layer._fusable(x, (), {}) is None
    torch.testing.assert_close(fused(x), stock(x), rtol=1e-5, atol=1e-5)
