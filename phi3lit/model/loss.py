"""LM head + cross-entropy without the full `[positions, vocab]` logits: a fused, chunked linear cross-entropy.

With Phi-3's 32,064-word vocabulary the logits dwarf everything else a LoRA step keeps: 4,096 trained positions
make a 0.5 GB fp32 logits tensor, and autograd also keeps the log-softmax (another 0.5 GB) and builds the
gradient of each in backward. For a chunk of positions h (c x d) with head W (V x d) and targets t,

    logits = h W^T,   loss = sum_i logsumexp(logits_i) - logits_i[t_i]
    dloss/dlogits = softmax(logits) - onehot(t),   dloss/dh = (dloss/dlogits) W,   dloss/dW = (dloss/dlogits)^T h

so the gradient of h is known as soon as a chunk's logits are. `chunked_cross_entropy` computes, chunk by chunk
in the forward pass, the loss and dloss/dh (and dloss/dW when the head trains), keeps only those (c x d each),
and frees the chunk's logits. Backward just scales the stored gradients by the incoming one. No logits are
recomputed (unlike checkpointing each chunk), and at most one `chunk x vocab` fp32 block exists at a time.
Liger Kernel's fused linear cross-entropy does the same in Triton on GPUs; this is the torch-native version.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, grad_enabled: bool):
        need_h = grad_enabled and ctx.needs_input_grad[0]  # evaluation needs the loss only
        need_w = grad_enabled and ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        loss = hidden.new_zeros((), dtype=torch.float32)
        hits = targets.new_zeros(())
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.T).float()  # fp32 softmax: bf16 logits lose ~3 digits of the loss
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            loss += (lse - picked).sum()
            hits += (logits.argmax(-1) == t).sum()
            if need_h or need_w:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place: the logits are no longer needed
                grad[torch.arange(len(t), device=t.device), t] -= 1
                grad = grad.to(weight.dtype)
                if need_h:
                    grad_h[start : start + chunk] = grad @ weight
                if need_w:
                    grad_w += (grad.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_hits):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, head, targets: torch.Tensor, chunk: int = 0):
    """(sum of cross-entropies, number of argmax hits) of `head(hidden)` against `targets`.

    `chunk <= 0`: the plain computation through autograd (full logits). `chunk > 0`: the fused version above for
    a bias-free `nn.Linear` head; any other head (e.g. peft's wrapper when `lm_head` is in `modules_to_save`)
    runs chunk by chunk under activation checkpointing instead. Both equal the plain one (tested to 1e-5).
    """

    def piece(h: torch.Tensor, t: torch.Tensor):
        logits = head(h).float()
        return F.cross_entropy(logits, t, reduction="sum"), (logits.detach().argmax(-1) == t).sum()

    if chunk <= 0:
        return piece(hidden, targets)
    if type(head) is torch.nn.Linear and head.bias is None:
        return _LinearCrossEntropy.apply(hidden, head.weight, targets, chunk, torch.is_grad_enabled())
    from torch.utils.checkpoint import checkpoint

    loss, hits = hidden.new_zeros((), dtype=torch.float32), targets.new_zeros(())
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        part, part_hits = checkpoint(piece, h, t, use_reentrant=False) if torch.is_grad_enabled() else piece(h, t)
        loss, hits = loss + part, hits + part_hits
    return loss, hits
