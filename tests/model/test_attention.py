"""`sdpa_docs` (one causal SDPA call per packed conversation) equals transformers' dense block-diagonal mask."""

import pytest
import torch
from helpers import packed_batch
from transformers import Phi3Config, Phi3ForCausalLM

from phi3lit.model import attention  # noqa: F401 (registers sdpa_docs)


def run(model: Phi3ForCausalLM, batch: dict, impl: str) -> tuple[torch.Tensor, dict]:
    model.set_attn_implementation(impl)
    model.zero_grad()
    extra = {"doc_offsets": batch["cu_seq_lens"]} if impl == attention.NAME else {}
    hidden = model.model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra
    ).last_hidden_state
    hidden.pow(2).mean().backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_model(sliding_window: int | None) -> Phi3ForCausalLM:
    torch.manual_seed(0)
    config = Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=256, sliding_window=sliding_window, pad_token_id=0,
    )  # fmt: skip
    return Phi3ForCausalLM(config).train()  # two kv heads for four query heads: the GQA path too


@pytest.mark.parametrize("sliding_window", [None, 7])
def test_document_attention_equals_dense_block_mask(sliding_window):
    model = tiny_model(sliding_window)
    # Two rows: documents shorter and longer than the window, a padding tail in the second row.
    batch = packed_batch([[5, 20, 15], [12, 9]], vocab=100)
    assert batch["input_ids"].shape == (2, 40) and batch["cu_seq_lens"].tolist() == [0, 5, 25, 40, 52, 61, 80]
    ref_out, ref_grads = run(model, batch, "sdpa")
    out, grads = run(model, batch, attention.NAME)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert ref_grads.keys() == grads.keys() and len(grads) > 0
    assert all(torch.allclose(grads[k], ref_grads[k], atol=1e-5) for k in grads)


def test_without_offsets_it_is_plain_sdpa_and_offsets_matter():
    model = tiny_model(None)
    batch = packed_batch([[10, 14]], vocab=100)
    ref = run(model, batch, "sdpa")[0]
    # Without offsets (as in generation) the function defers to transformers' sdpa and its mask: same result.
    model.set_attn_implementation(attention.NAME)
    no_offsets = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    assert torch.allclose(no_offsets.last_hidden_state, ref, atol=1e-5)
    # Offsets that merge the two documents let the second attend to the first: the isolation is real.
    merged = dict(batch, cu_seq_lens=torch.tensor([0, 24]))
    assert not torch.allclose(run(model, merged, attention.NAME)[0], ref, atol=1e-3)


def test_generation_with_sdpa_docs_matches_sdpa(tiny_path, tiny_tokenizer):
    from phi3lit.model.generate import generate_ids

    model = Phi3ForCausalLM.from_pretrained(tiny_path).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]  # different lengths: left padding and a padding mask
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    replies = {}
    for impl in ("sdpa", attention.NAME):
        model.set_attn_implementation(impl)
        replies[impl] = generate_ids(model, tiny_tokenizer, ids, mask, 8)
    assert replies["sdpa"] == replies[attention.NAME] and len(prompts) == len(replies["sdpa"])


def test_documents_run_the_fused_cpu_kernel_not_the_math_path():
    """Each conversation goes through SDPA's flash kernel for CPU (forward and backward), which needs 4-D inputs;
    3-D slices silently take the math path (bmm + softmax, keeping the attention matrix for backward)."""
    model = tiny_model(None)
    batch = packed_batch([[5, 20, 15], [12, 9]], vocab=100)
    with torch.profiler.profile() as prof:
        run(model, batch, attention.NAME)
    ops = {e.key for e in prof.key_averages()}
    assert {"aten::_scaled_dot_product_flash_attention_for_cpu"} <= ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
