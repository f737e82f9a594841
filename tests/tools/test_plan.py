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
