"""The chunked LM-head cross-entropy equals the standard one, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from phi3lit.model import chunked_cross_entropy


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
