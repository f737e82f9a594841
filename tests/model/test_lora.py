"""LoRA targets, slice-aware adapters on fused projections, peft variants and loralib's workflow."""

import pytest
import torch
from torch import nn

from phi3lit.model.lora import (
    LoraSpec,
    apply_lora,
    effective_trainable,
    lora_state_dict,
    mark_only_lora_as_trainable,
    resolve_targets,
)

REAL = dict(h=3072, i=8192, layers=32, vocab=32064)  # Phi-3-mini-4k-instruct
TINY = dict(h=256, i=512, layers=2, vocab=512)  # phi3lit.tiny.TINY_CONFIG, 4 heads, no GQA


def hand_count(shape, r, parts):
    """LoRA adds r * (in + out) per adapted Linear; a sliced module has one A per slice."""
    h, i, L, V = shape["h"], shape["i"], shape["layers"], shape["vocab"]
    size = {
        "qkv": r * (h + 3 * h), "q": r * (h + h), "k": r * (h + h), "v": r * (h + h), "o": r * (h + h),
        "gate_up": r * (h + 2 * i), "gate": r * (h + i), "up": r * (h + i), "down": r * (i + h),
    }  # fmt: skip
    per_layer = sum(size[p] for p in parts if p not in ("embed", "lm_head"))
    return L * per_layer + ("embed" in parts) * r * (V + h) + ("lm_head" in parts) * r * (h + V)


CASES = [  # targets, parts counted by hand
    (["all-linear"], ["qkv", "o", "gate_up", "down"]),
    (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], ["qkv", "o", "gate_up", "down"]),
    (["attn"], ["qkv", "o"]),
    (["mlp"], ["gate_up", "down"]),
    (["q", "v"], ["q", "v"]),
    (["q", "k", "v"], ["qkv"]),
    (["k"], ["k"]),
    (["o"], ["o"]),
    (["gate"], ["gate"]),
    (["up", "down"], ["up", "down"]),
    (["q", "v", "mlp"], ["q", "v", "gate_up", "down"]),
    (["embed"], ["embed"]),
    (["lm_head", "o"], ["lm_head", "o"]),
]


def meta_model(shape):
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        hidden_size=shape["h"], intermediate_size=shape["i"], num_hidden_layers=shape["layers"],
        num_attention_heads=32 if shape is REAL else 4, num_key_value_heads=32 if shape is REAL else 4,
        vocab_size=shape["vocab"], max_position_embeddings=4096, pad_token_id=0,
    )  # fmt: skip
    with torch.device("meta"):
        return Phi3ForCausalLM(config)


@pytest.mark.parametrize("shape", [TINY, REAL], ids=["tiny", "phi3-mini"])
@pytest.mark.parametrize("targets, parts", CASES, ids=["+".join(c[0]) for c in CASES])
def test_exact_trainable_counts(shape, targets, parts):
    model = apply_lora(meta_model(shape), LoraSpec(r=8, targets=targets))
    assert effective_trainable(model) == hand_count(shape, 8, parts)


def test_issue_reference_numbers_on_meta():
    assert effective_trainable(apply_lora(meta_model(REAL), LoraSpec(r=16, targets=["all-linear"]))) == 25_165_824
    assert effective_trainable(apply_lora(meta_model(REAL), LoraSpec(r=8, targets=["q", "v"]))) == 3_145_728


def test_resolve_targets():
    assert resolve_targets(["q", "v", "o"]) == {"qkv_proj": ("q", "v"), "o_proj": None}
    assert resolve_targets(["attn"]) == {"qkv_proj": None, "o_proj": None}
    assert resolve_targets(["gate", "up"]) == {"gate_up_proj": None}
    assert resolve_targets(["v", "q"]) == {"qkv_proj": ("q", "v")}  # slices keep the fused row order
    with pytest.raises(ValueError, match="unknown target 'qq'"):
        resolve_targets(["qq"])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(targets=["q", "v"], use_dora=True), "use_dora and pissa/olora"),
        (dict(targets=["gate"], init="pissa"), "use_dora and pissa/olora"),
        (dict(targets=["q"], rank_pattern={"qkv_proj": 4}), "sliced modules"),
        (dict(targets=["lm_head"], modules_to_save=["lm_head"]), "both a LoRA target and in modules_to_save"),
        (dict(modules_to_save=["q"]), "not a whole module"),
        (dict(r=-1), "model.lora.r must be positive"),
    ],
)
def test_unsupported_combinations_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        LoraSpec(**kw)


def tiny_lora(tiny_path, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return apply_lora(AutoModelForCausalLM.from_pretrained(tiny_path), LoraSpec(dropout=0.0, **kw))


def test_slice_target_leaves_other_slices_bit_identical(tiny_path):
    model = tiny_lora(tiny_path, targets=["q", "v", "up"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(3, 500, (2, 32))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    x = torch.randn(5, 256)
    attn = model.base_model.model.model.layers[0].self_attn.qkv_proj
    mlp = model.base_model.model.model.layers[0].mlp.gate_up_proj
    with torch.no_grad():
        out, base = attn(x), attn.base_layer(x)
        assert torch.equal(out[:, 256:512], base[:, 256:512])  # k rows: bit-identical
        assert not torch.allclose(out[:, :256], base[:, :256]) and not torch.allclose(out[:, 512:], base[:, 512:])
        out, base = mlp(x), mlp.base_layer(x)
        assert torch.equal(out[:, :512], base[:, :512])  # gate rows
        assert not torch.allclose(out[:, 512:], base[:, 512:])  # up rows trained


@pytest.mark.parametrize(
    "kw",
    [dict(use_rslora=True), dict(use_dora=True), dict(init="gaussian"), dict(init="pissa"), dict(init="olora")],
    ids=["rslora", "dora", "gaussian", "pissa", "olora"],
)
def test_peft_variants_train(tiny_path, kw):
    model = tiny_lora(tiny_path, targets=["attn"], **kw)
    ids = torch.randint(3, 500, (1, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    dora_extra = 2 * (768 + 256) if kw.get("use_dora") else 0  # one magnitude per output row
    assert effective_trainable(model) == 2 * (16 * (256 + 768) + 16 * (256 + 256)) + dora_extra


def test_rank_and_alpha_patterns(tiny_path):
    model = tiny_lora(tiny_path, targets=["o", "down"], rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 8})
    assert effective_trainable(model) == 2 * (16 * (256 + 256) + 4 * (512 + 256))
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
    assert o_proj.scaling["default"] == 8 / 16


def test_modules_to_save_train_fully(tiny_path):
    model = tiny_lora(tiny_path, targets=["o"], modules_to_save=["embed", "lm_head"])
    assert effective_trainable(model) == 2 * 16 * (256 + 256) + 2 * 1088 * 256  # 1,026 token ids padded to 1,088


# ---------------------------------------------------------------------------- loralib workflow
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def toy_lora():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(Toy(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))


EXPECTED_BIASES = {
    "none": set(),
    "all": {"fc1", "fc2", "head"},
    "lora_only": {"fc1", "fc2"},
}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable(bias):
    model = toy_lora()
    mark_only_lora_as_trainable(model, bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert len(lora) == 4
    biases = {n.split(".")[2] for n in trainable - lora}
    assert biases == EXPECTED_BIASES[bias]
    assert all(n.endswith("bias") for n in trainable - lora)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_lora_state_dict_then_base_and_lora_checkpoints_with_strict_false(bias):
    model = toy_lora()
    mark_only_lora_as_trainable(model, bias=bias)
    base_sd = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(16, 8)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    sd = lora_state_dict(model, bias=bias)
    assert {k.split(".")[2] for k in sd if k.endswith("bias")} == EXPECTED_BIASES[bias]
    assert sum("lora_" in k for k in sd) == 4

    fresh = toy_lora()
    torch.manual_seed(1)
    for p in fresh.parameters():  # make sure every tensor really comes from the two checkpoints
        p.data.normal_()
    fresh.load_state_dict(base_sd, strict=False)
    result = fresh.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    if bias == "none":  # trained biases stay at the base values: the two models agree
        torch.testing.assert_close(fresh(x), model(x))
    else:
        trained_biases = {k: v for k, v in sd.items() if k.endswith("bias")}
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained_biases.items())
        torch.testing.assert_close(fresh(x), model(x))
    # ... and training continues from there.
    mark_only_lora_as_trainable(fresh, bias=bias)
    opt = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.5)
    before = fresh(x).pow(2).mean().item()
    fresh(x).pow(2).mean().backward()
    opt.step()
    assert fresh(x).pow(2).mean().item() < before


@pytest.mark.parametrize("targets", [["qkv_proj", "down_proj"], ["q", "v"]])  # whole and slice-aware layers
def test_zero_dropout_is_identity_so_no_input_copy(tiny_path, targets):
    from transformers import AutoModelForCausalLM

    model = tiny_lora(tiny_path, targets=targets)  # dropout 0
    drops = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    assert drops and all(isinstance(m, nn.Identity) for m in drops)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_path), LoraSpec(dropout=0.05, targets=targets))
    drops = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    assert drops and all(isinstance(m, nn.Dropout) for m in drops)
