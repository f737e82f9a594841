"""The module on a real tiny Phi3ForCausalLM with real peft: trainable set, exact counts, packing isolation."""

import pytest
import torch

from phi3lit.data import collate, tokenize_chat
from phi3lit.model.lora import LoraSpec, apply_lora
from phi3lit.model.module import Phi3LoRA

CONVS = [
    [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "12 + 7 = 19."}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Reverse the words: red blue green"},
        {"role": "assistant", "content": "green blue red"},
        {"role": "user", "content": "Count from 3 to 9."},
        {"role": "assistant", "content": "3, 4, 5, 6, 7, 8, 9"},
    ],
    [{"role": "user", "content": "Shout: sun moon"}, {"role": "assistant", "content": "SUN MOON!"}],
]


def make_module(tiny_path, **kw) -> Phi3LoRA:
    torch.manual_seed(0)
    module = Phi3LoRA(pretrained=tiny_path, lora=LoraSpec(dropout=0.0), **kw)
    module.configure_model()
    # B starts at zero in LoRA; give it values so the adapters actually change the function under test.
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return module


def test_only_lora_is_trainable_with_exact_count(tiny_path):
    module = make_module(tiny_path)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    h, i = 256, 512  # tiny shape from phi3lit.tiny.TINY_CONFIG
    per_layer = 16 * ((h + 3 * h) + (h + h) + (h + 2 * i) + (i + h))  # qkv, o, gate_up, down
    assert module.param_counts()[0] == 2 * per_layer == 114_688


@pytest.mark.parametrize(
    "spec",
    [
        LoraSpec(dropout=0.0),
        LoraSpec(targets=["q", "v"], modules_to_save=["lm_head"]),
        LoraSpec(targets=["o_proj"], use_dora=True),
    ],
    ids=["all-linear", "slices+modules_to_save", "dora"],
)
def test_checkpoints_hold_exactly_what_trains(tiny_path, spec):
    """The checkpoint filter is lora.lora_state_dict: LoRA tensors, DoRA magnitudes, modules_to_save copies."""
    module = Phi3LoRA(pretrained=tiny_path, lora=spec)
    module.configure_model()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert module.adapter_state_names() == trainable


def test_real_phi3_mini_shape_count_on_meta():
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
    )  # fmt: skip
    with torch.device("meta"):
        model = apply_lora(Phi3ForCausalLM(config), LoraSpec(r=16))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable == 25_165_824  # 32 * 16 * ((3072+9216) + (3072+3072) + (3072+16384) + (8192+3072))
    assert total - trainable == 3_821_079_552  # Phi-3-mini's 3.82 B frozen parameters


def separate_and_packed(module, tok):
    convs = [tokenize_chat(c, tok) for c in CONVS]
    total, n = 0.0, 0
    for c in convs:
        s, k, _ = module.token_losses(collate([[c]], pad_id=0))
        total, n = total + s, n + k
    packed_sum, packed_n, _ = module.token_losses(collate([convs], pad_id=0))
    return total / n, packed_sum / packed_n, n, packed_n


@pytest.mark.parametrize("attn", ["sdpa_docs", "sdpa", "eager"])
def test_packed_loss_equals_separate_losses(tiny_path, tiny_tokenizer, attn):
    module = make_module(tiny_path, attn_implementation=attn)
    separate, packed, n, packed_n = separate_and_packed(module, tiny_tokenizer)
    assert n == packed_n
    assert abs(separate.item() - packed.item()) < 1e-5


def test_loss_index_from_collate_equals_the_boolean_mask(tiny_path, tiny_tokenizer):
    convs = [tokenize_chat(c, tiny_tokenizer) for c in CONVS]
    batch = collate([convs[:2], convs[2:]], pad_id=0)
    module = make_module(tiny_path)
    with_index = module.token_losses(batch)
    without = module.token_losses({k: v for k, v in batch.items() if k != "loss_index"})
    labels = batch["labels"][:, 1:]
    assert with_index[1].item() == without[1].item() == (labels != -100).sum().item()
    assert torch.equal(with_index[0], without[0]) and with_index[2].item() == without[2].item()


def test_packing_without_position_ids_would_leak(tiny_path, tiny_tokenizer):
    # The isolation test can fail: with plain causal positions (and no document offsets) the packed loss changes.
    module = make_module(tiny_path)
    convs = [tokenize_chat(c, tiny_tokenizer) for c in CONVS]
    batch = collate([convs], pad_id=0)
    isolated = module.token_losses(batch)[0]
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    del batch["cu_seq_lens"], batch["doc_offsets"]
    assert abs(module.token_losses(batch)[0].item() - isolated.item()) > 1e-3


def test_gradient_checkpointing_gives_same_gradients(tiny_path, tiny_tokenizer):
    batch = collate([[tokenize_chat(c, tiny_tokenizer) for c in CONVS]], pad_id=0)
    grads = []
    for gc in (False, True):
        module = make_module(tiny_path, gradient_checkpointing=gc)  # configure_model leaves it in train mode
        module.token_losses(batch)[0].backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
    assert module.model.get_base_model().model.gradient_checkpointing


def test_invalid_lora_values_fail_early():
    with pytest.raises(ValueError, match="model.lora.r"):
        LoraSpec(r=0)
    with pytest.raises(ValueError, match="model.lora.dropout"):
        LoraSpec(dropout=1.0)


@pytest.mark.slow  # compiling two layers with inductor takes about a minute on 2 cores
def test_compiled_layers_give_the_same_loss_and_gradients(tiny_path, tiny_tokenizer):
    convs = [tokenize_chat(c, tiny_tokenizer) for c in CONVS]
    batch = collate([convs[:2], convs[2:]], pad_id=0)  # two rows, so documents and padding both occur
    results = []
    for compiled in (False, True):
        module = make_module(tiny_path, compile=compiled)
        loss, n, _ = module.token_losses(batch)
        loss.backward()
        results.append((loss.item(), {k: p.grad.clone() for k, p in module.named_parameters() if p.requires_grad}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert abs(eager_loss - compiled_loss) < 1e-4 * abs(eager_loss)
    assert all(torch.allclose(eager_grads[k], compiled_grads[k], atol=1e-5) for k in eager_grads)
