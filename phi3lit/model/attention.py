"""Packed rows without cross-document attention, at the cost of plain causal attention.

A packed row holds several conversations; a token must attend only to earlier tokens of its own conversation.
transformers enforces that with a dense `rows x T x T` block-diagonal mask built from the restarting
`position_ids`. SDPA then cannot take its causal fast path: on CPU its kernel does all T^2 work of a masked
row, although the block-causal pattern needs only sum(L_i^2)/2 for documents of lengths L_i.

`sdpa_docs` is registered with transformers as an attention implementation. When the batch carries the
documents' offsets (`doc_offsets`: cumulative lengths over the flattened `rows x T` tokens, from
`phi3lit.data.collate`), it calls SDPA once per document with `is_causal=True`, so no mask is read and each
document costs L^2/2. The offsets are a host (CPU) tensor: reading them never waits for a GPU, and a compiled
layer sees a tensor input instead of a list it would specialise (and recompile) on. Without offsets (generation with
a KV cache, left-padded prompts) it is transformers' `sdpa`. Results equal `sdpa` with the dense mask (tested
to 1e-5, forward and gradients).

On GPU, `flash_attention_2` gets the same offsets as `cu_seq_lens` and runs its varlen kernel instead.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "sdpa_docs"


@torch.compiler.disable  # offsets differ every batch: a compiled loop would recompile for each
def document_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    doc_offsets: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: (rows, heads, T, dim) in, (rows, T, heads, dim) out."""
    if doc_offsets is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    rows, heads, length, _ = query.shape
    gqa = key.shape[1] != heads  # SDPA repeats the key/value heads itself
    pieces: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    for start, end in itertools.pairwise(doc_offsets.tolist()):
        row, a = divmod(start, length)
        b = end - row * length  # documents never cross rows: collate ends every row with its own padding run
        # 4-D slices (1, heads, L, dim): with 3-D ones the CPU falls back from its flash kernel to the math path.
        q, k, v = query[row : row + 1, :, a:b], key[row : row + 1, :, a:b], value[row : row + 1, :, a:b]
        mask = None
        if sliding_window is not None and b - a > sliding_window:  # Phi-3's window only matters past its width
            i = torch.arange(b - a, device=query.device)
            distance = i[:, None] - i[None, :]
            mask = (distance >= 0) & (distance < sliding_window)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None, enable_gqa=gqa
        )
        pieces[row].append(out)
    out = torch.cat([torch.cat(p, dim=2) for p in pieces])  # (rows, heads, T, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, document_attention)
# Generation passes padding masks and a cache, so the mask is built as for `sdpa`; in training it is ignored.
AttentionMaskInterface.register(NAME, sdpa_mask)


def document_kwargs(batch: dict, attn_implementation: str) -> dict:
    """Where each packed conversation starts, for kernels that skip the dense mask (none: they use it)."""
    if "cu_seq_lens" not in batch:
        return {}
    if attn_implementation == "sdpa_docs":
        return {"doc_offsets": torch.tensor(batch["doc_offsets"])}  # built on the host: no device sync
    if attn_implementation == "flash_attention_2":
        # transformers infers documents from position_ids only for a single row; these cover any batch.
        cu, longest = batch["cu_seq_lens"], batch["max_seq_len"]
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    return {}
