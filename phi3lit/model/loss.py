"""LM head + cross-entropy without the full `[positions, vocab]` logits: a fused, chunked linear cross-entropy.

With Phi-3's 32,064-word vocabulary the logits dwarf everything else a LoRA step keeps: 4,096 trained positions
make a 0.5 GB fp32 logits tensor, and autograd also keeps the log-softmax (another 0.5 GB) and builds the
gradient of each in backward. For a chunk of positions h (c x d) with head W (V x d) and targets t,

    logits = h W^T,   loss = sum_i logsumexp(logits_i) - logits_i[t_i]
    dloss/dlogits = softmax(logits) - onehot(t),   dloss/dh = (dloss/dlogits) W,   dloss/dW = (dloss/dlogits)^T h

so the gradient of h is known as soon as a chunk's logits are. With e = exp(logits - max) and z its row sum,
softmax - onehot(t) = e / z - onehot(t), so dloss/dh = (e W) / z - W[t]: the division and the onehot act on the
small side (c x d), and e overwrites the logits in place. `chunked_cross_entropy` computes, chunk by chunk
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
            top = logits.amax(-1, keepdim=True)
            picked = logits.gather(1, t[:, None])
            hits += (picked >= top).sum()  # the target holds the largest logit: argmax's hit (ties aside)
            # In place from here: exp(logits - top) overwrites the logits, no second chunk x vocab block.
            exp = logits.sub_(top).exp_()
            total = exp.sum(-1, keepdim=True)
            loss += (top + total.log() - picked).sum()  # logsumexp - picked logit
            if need_h or need_w:
                # softmax - onehot(t), without a pass to divide or subtract over the chunk: the 1 / total and
                # the onehot are applied on the small side of each matmul (rows of W and of h).
                exp, inv = exp.to(weight.dtype), total.reciprocal()
                if need_h:
                    grad_h[start : start + chunk] = (exp @ weight).float().mul_(inv).sub_(weight[t].float())
                if need_w:
                    grad_w += (exp.T @ (h.float() * inv).to(weight.dtype)).float()
                    grad_w.index_add_(0, t, h.float(), alpha=-1)
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
