"""LongRoPE per conversation: the short/long RoPE factors chosen per packed conversation, as inference sees it.

transformers rescales Phi-3's RoPE with `short_factor` or `long_factor`, chosen from `max(position_ids) + 1` over
the whole batch. A packed row restarts positions at every conversation, so stock transformers would pick the long
factors for every conversation of a batch as soon as one conversation, or one padding run, is longer than
`original_max_position_embeddings`. Inference encodes a conversation of L tokens with the long factors exactly when
L > original_max_position_embeddings; `install_document_rope` makes training do the same.
"""

from __future__ import annotations

import torch
from torch import nn


def document_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """Length of the conversation each token belongs to, from positions that restart at 0 per conversation.

    A row's first token always starts a run (a decoding step with a KV cache sees one position, p: length p + 1).
    """
    starts = position_ids == 0
    starts[:, 0] = True
    run = starts.long().cumsum(1) - 1  # run index within the row
    rows, width = position_ids.shape
    flat = run + torch.arange(rows, device=run.device)[:, None] * width  # unique over the batch
    longest = torch.zeros(rows * width, dtype=position_ids.dtype, device=position_ids.device)
    longest = longest.scatter_reduce(0, flat.flatten(), position_ids.flatten(), reduce="amax")
    return longest[flat] + 1


class DocumentLongRoPE(nn.Module):
    """Phi-3's LongRoPE with the short/long choice made per conversation instead of per batch.

    Equal to transformers' `Phi3RotaryEmbedding` for a single conversation (the choice is the same:
    long factors exactly when its length exceeds `original_max_position_embeddings`), so an adapter trained on
    packed rows sees each conversation as inference does.
    """

    def __init__(self, rotary: nn.Module):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = rotary.config
        self.config = config
        self.original = int(config.rope_parameters["original_max_position_embeddings"])
        self.attention_scaling = rotary.attention_scaling
        short, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None)
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=self.original + 1)
        device = rotary.original_inv_freq.device
        self.short_inv_freq = nn.Buffer(short.to(device), persistent=False)
        self.long_inv_freq = nn.Buffer(long.to(device), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        long = (document_lengths(position_ids) > self.original)[..., None]
        inv_freq = torch.where(long, self.long_inv_freq.float(), self.short_inv_freq.float())
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def uses_longrope(config) -> bool:
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("rope_type") == "longrope"


def install_document_rope(model: nn.Module) -> bool:
    """Swap a LongRoPE Phi-3's rotary embedding for `DocumentLongRoPE`; True if it did (no-op otherwise).

    `model` is a `Phi3ForCausalLM` (or anything whose `.model.rotary_emb` / `.rotary_emb` is Phi-3's). Nothing is
    saved from the rotary module (its buffers are not persistent), so checkpoints and exports are unchanged.
    """
    inner = getattr(model, "model", model)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or isinstance(rotary, DocumentLongRoPE) or not uses_longrope(rotary.config):
        return False
    inner.rotary_emb = DocumentLongRoPE(rotary)
    return True
