"""GPU-only paths, prepared for a machine with CUDA (skipped here: CI and the dev machines have no GPU).

Run on a GPU box with `python -m pytest -m gpu tests/e2e/test_gpu.py` (QLoRA needs `pip install 'phi3lit[qlora]'`,
DeepSpeed `pip install 'phi3lit[deepspeed]'`). Each fits the tiny model for a few steps through the real CLI.
"""

import importlib.util
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def fit(tmp_path, *extra):
    cmd = [
        sys.executable, "-m", "phi3lit", "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.max_steps", "6",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path), *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-mixed"])
def test_precisions_on_gpu(tmp_path, precision):
    ckpt = fit(tmp_path, "--trainer.precision", precision)
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in ckpt["state_dict"].values())


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs phi3lit[qlora]")
def test_qlora_trains_and_merges_onto_bf16(tmp_path):
    fit(tmp_path, "--model.quantization", "nf4", "--model.torch_dtype", "bfloat16", "--trainer.precision", "bf16-mixed")
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "phi3lit", "export", "--ckpt", str(tmp_path / "checkpoints" / "last.ckpt"),
           "--out", str(out), "--merge", "true", "--dtype", "bf16"]  # fmt: skip
    assert subprocess.run(cmd, cwd=ROOT, timeout=600).returncode == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_fsdp_checkpoint_is_full_lora(tmp_path):
    ckpt = fit(tmp_path, "--config", str(ROOT / "configs" / "strategy" / "fsdp.yaml"), "--trainer.devices", "1")
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs phi3lit[deepspeed]")
def test_deepspeed_zero2(tmp_path):
    fit(tmp_path, "--config", str(ROOT / "configs" / "strategy" / "deepspeed_zero2.yaml"), "--trainer.devices", "1")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_flash_attention_packed_equals_sdpa(tmp_path):
    a = fit(tmp_path / "sdpa", "--trainer.precision", "bf16-mixed", "--model.torch_dtype", "bfloat16")
    b = fit(tmp_path / "fa2", "--trainer.precision", "bf16-mixed", "--model.torch_dtype", "bfloat16",
            "--model.attn_implementation", "flash_attention_2")  # fmt: skip
    assert max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"]) < 5e-2


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_flash_attention_varlen_isolates_documents_across_rows():
    # transformers infers documents from position_ids only for one row; phi3lit passes cu_seq_lens for any batch.
    from helpers import packed_batch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=100, pad_token_id=0, sliding_window=None)  # fmt: skip
    model = Phi3ForCausalLM(config).to("cuda", torch.bfloat16)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed_batch([[30, 50], [20, 41]], 100).items()}
    from phi3lit.model.module import Phi3LoRA

    outs = {}
    for impl in ("sdpa", "flash_attention_2"):
        extra = Phi3LoRA(attn_implementation=impl)._document_kwargs(batch)  # what training passes
        assert bool(extra) == (impl == "flash_attention_2")
        model.set_attn_implementation(impl)
        outs[impl] = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                                 **extra).last_hidden_state.float()  # fmt: skip
    assert (outs["sdpa"] - outs["flash_attention_2"]).abs().max().item() < 5e-2
