"""export: fused peft adapter, split (Llama-layout) adapter on a split base, merged model."""

import json

import pytest
import torch
from conftest import ROOT

from phi3lit.cli import main
from phi3lit.export import split_base
from phi3lit.model import Phi3LoRA
from phi3lit.tiny import TINY_DATA

IDS = torch.tensor([[7, 20, 30, 40, 50, 60, 6, 3, 100, 200, 300, 400]])


@pytest.fixture(scope="module", params=[["q", "v", "up", "down"], ["all-linear"]], ids=["sliced", "all-linear"])
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data = root / "d.jsonl"
    data.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[:40]))
    targets = "[" + ",".join(request.param) + "]"
    main([
        "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.train_file", str(data),
        "--trainer.default_root_dir", str(root), "--trainer.max_steps", "6", "--data.max_length", "128",
        "--trainer.enable_progress_bar", "false", "--model.lora.targets", targets, "--model.lora.use_rslora", "true",
    ])  # fmt: skip
    ckpt = root / "checkpoints" / "last.ckpt"
    module = Phi3LoRA.load_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        logits = module.model(input_ids=IDS).logits
    return ckpt, logits, root


def base_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path).eval()


def test_fused_adapter_loads_in_stock_peft(trained, tiny_path, tmp_path):
    from peft import PeftModel

    ckpt, expected, _ = trained
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path)])
    model = PeftModel.from_pretrained(base_model(tiny_path), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(base_model(tiny_path)(input_ids=IDS).logits, expected, atol=1e-3)


def test_split_adapter_on_split_base_equals_fused(trained, tiny_path, tmp_path):
    from peft import PeftModel

    ckpt, expected, _ = trained
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path), "--layout", "split"])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not {"qkv_proj", "gate_up_proj"} & set(cfg["target_modules"])
    llama = split_base(base_model(tiny_path))
    assert type(llama).__name__ == "LlamaForCausalLM"
    with torch.no_grad():  # the split base alone is the same function as the fused base
        torch.testing.assert_close(llama(input_ids=IDS).logits, base_model(tiny_path)(input_ids=IDS).logits)
    model = PeftModel.from_pretrained(llama, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


def test_merged_model_loads_without_peft(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, expected, _ = trained
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path), "--merge"])
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids("<|end|>") > 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=1e-4, rtol=0)


def test_bf16_export(trained, tmp_path):
    from safetensors.torch import load_file

    ckpt, _, _ = trained
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path), "--dtype", "bf16"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
