"""plan: meta-device counts and a memory estimate checked against a measurement on the tiny model."""

import torch
from helpers import ROOT

from phi3lit.__main__ import main
from phi3lit.model.lora import LoraSpec, apply_lora
from phi3lit.tools.plan import estimate, saved_bytes


def test_plan_command_prints_counts(capsys):
    main(["plan", "--config", str(ROOT / "configs" / "tiny.yaml")])
    out = capsys.readouterr().out
    assert "114,688 trainable" in out and "training memory estimate" in out


def test_real_model_plan_offline():
    r = estimate("microsoft/Phi-3-mini-4k-instruct", LoraSpec(r=16), "bfloat16", "bf16-mixed", 4, 4096, True)
    assert r["trainable_params"] == 25_165_824 and r["total_params"] == 3_846_245_376
    assert r["adapter_bytes"] == 25_165_824 * 4  # ~96 MiB in fp32 instead of 7.6 GB for the base
    assert r["memory"]["frozen weights"] == (3_846_245_376 - 25_165_824) * 2


def test_activation_estimate_matches_measurement_on_tiny(tiny_path):
    from transformers import AutoModelForCausalLM

    r = estimate("builtin:tiny-phi3", LoraSpec(), "float32", "32-true", 4, 512, False)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_path), LoraSpec()).train()
    measured = saved_bytes(model, torch.randint(3, 500, (4, 512)))
    assert abs(r["memory"]["activations"] - measured) / measured < 0.05


def test_plan_under_fsdp2_splits_the_layers_and_the_lora_state(capsys):
    """`plan` with the FSDP2 overlay: per device, the decoder layers' weights and the LoRA state are halved over 2
    processes; the embeddings and LM head stay whole, one gathered layer is added."""
    tiny, fsdp2 = str(ROOT / "configs" / "tiny.yaml"), str(ROOT / "configs" / "strategy" / "fsdp2.yaml")
    main(["plan", "--config", tiny])
    one = capsys.readouterr().out
    main(["plan", "--config", tiny, "--config", fsdp2, "--trainer.accelerator", "cpu"])
    two = capsys.readouterr().out
    assert "training memory estimate (per device, FSDP2 over 2 processes)" in two

    r1 = estimate("builtin:tiny-phi3", LoraSpec(), "float32", "32-true", 4, 512, False)
    r2 = estimate("builtin:tiny-phi3", LoraSpec(), "float32", "32-true", 4, 512, False, shards=2)
    assert r2["memory"]["LoRA weights + grads + AdamW"] == r1["memory"]["LoRA weights + grads + AdamW"] / 2
    from transformers import AutoConfig

    from phi3lit.hub import resolve_pretrained

    c = AutoConfig.from_pretrained(resolve_pretrained("builtin:tiny-phi3"))
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    per_layer = (h * (h + 2 * kv) + h * h + h * 2 * i + i * h + 2 * h) * 4  # qkv, o, gate_up, down, 2 norms (fp32)
    layers = c.num_hidden_layers * per_layer
    assert r2["memory"]["frozen weights"] == r1["memory"]["frozen weights"] - layers / 2 + per_layer
    assert r2["memory"]["activations"] == r1["memory"]["activations"] and one != two
