"""The chunked LM-head cross-entropy equals the standard one, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from phi3lit.model.loss import chunked_cross_entropy


@pytest.mark.parametrize("chunk", [0, 1, 7, 64, 1000])
def test_chunked_matches_standard_cross_entropy(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(48, 501, bias=False)
    hidden = torch.randn(100, 48, requires_grad=True)
    targets = torch.randint(0, 501, (100,))

    ref_logits = head(hidden).float()
    ref = F.cross_entropy(ref_logits, targets, reduction="sum")
    ref_hits = (ref_logits.argmax(-1) == targets).sum()
    ref_grads = torch.autograd.grad(ref, [hidden, head.weight])

    loss, hits = chunked_cross_entropy(hidden, head, targets, chunk)
    grads = torch.autograd.grad(loss, [hidden, head.weight])
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    assert hits == ref_hits
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_fused_under_no_grad_and_in_bf16_and_the_fallback_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 300, bias=False).requires_grad_(False)  # frozen, as Phi-3's lm_head under LoRA
    hidden = torch.randn(50, 32)
    targets = torch.randint(0, 300, (50,))
    ref = F.cross_entropy(head(hidden), targets, reduction="sum")
    with torch.no_grad():  # evaluation: no gradient is computed or kept
        loss, _ = chunked_cross_entropy(hidden, head, targets, 16)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    # A head that is not a plain Linear (peft's modules_to_save wrapper) takes the checkpointed path.
    wrapped = torch.nn.Sequential(head)
    h = hidden.clone().requires_grad_(True)
    loss, _ = chunked_cross_entropy(h, wrapped, targets, 16)
    (grad,) = torch.autograd.grad(loss, h)
    (ref_grad,) = torch.autograd.grad(F.cross_entropy(head(h), targets, reduction="sum"), h)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
    # bf16 weights and activations: logits and softmax in fp32 either way, gradients cast back to bf16.
    head16, h16 = head.to(torch.bfloat16), hidden.to(torch.bfloat16).requires_grad_(True)
    ref16 = F.cross_entropy(head16(h16).float(), targets, reduction="sum")
    (ref_grad16,) = torch.autograd.grad(ref16, h16)
    loss16, _ = chunked_cross_entropy(h16, head16, targets, 16)
    (grad16,) = torch.autograd.grad(loss16, h16)
    assert grad16.dtype == torch.bfloat16
    torch.testing.assert_close(loss16, ref16, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(grad16, ref_grad16, atol=1e-2, rtol=1e-2)
