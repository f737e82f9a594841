"""Replies from a (peft) Phi-3: chat-template prompts, left padding, KV-cached decoding that stops at <|end|>.

Used by `predict`, by the validation samples in TensorBoard and by `chat`. This is the only place phi3lit
decodes, and the only place `use_cache=True`: training and evaluation pass `use_cache=False` so that packed
rows get their block-causal mask.
"""

from __future__ import annotations

import torch

from phi3lit.data.chat import tokenize_chat
from phi3lit.data.pack import left_pad


def stop_ids(tokenizer) -> list[int]:
    """<|end|> closes a turn, eos (<|endoftext|>) closes the text; either ends a reply."""
    ids = tokenizer.convert_tokens_to_ids(["<|end|>", tokenizer.eos_token])
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]  # unknown tokens map to <unk>


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer=None,
) -> list[list[int]]:
    """New token ids per prompt (stop token excluded). temperature 0 is greedy decoding."""
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        use_cache=True,
        eos_token_id=stop_ids(tokenizer),
        pad_token_id=tokenizer.unk_token_id or 0,  # <unk>, never eos
        streamer=streamer,
    )
    stops, pad = set(stop_ids(tokenizer)), tokenizer.unk_token_id or 0
    replies = []
    for row in out[:, input_ids.shape[1] :].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        replies.append([t for t in row[:cut] if t != pad])
    return replies


def generate_replies(model, tokenizer, conversations: list[list[dict]], **kw) -> list[str]:
    """Reply to each conversation (its trailing assistant turns should already be removed)."""
    prompts = [tokenize_chat(c, tokenizer, add_generation_prompt=True)["input_ids"] for c in conversations]
    ids, mask = left_pad(prompts, tokenizer.unk_token_id or 0)
    device = next(model.parameters()).device
    replies = generate_ids(model, tokenizer, ids.to(device), mask.to(device), **kw)
    return [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
