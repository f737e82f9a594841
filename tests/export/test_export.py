"""export: fused peft adapter, split (Llama-layout) adapter on a split base, merged model, and what each client
(stock peft, transformers, vLLM's and llama.cpp's scale rules) makes of them."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import ROOT

from phi3lit.__main__ import main
from phi3lit.errors import ConfigError
from phi3lit.export.adapter_files import TOKENIZER_FILES, copy_tokenizer_files, split_base
from phi3lit.export.clients import preflight_adapter, refuse_if
from phi3lit.model.adapter import read_adapter_config
from phi3lit.model.module import Phi3LoRA
from phi3lit.tiny import TINY_DATA

IDS = torch.tensor([[7, 20, 30, 40, 50, 60, 6, 3, 100, 200, 300, 400]])


# Every variant whose scales differ between clients: slices (rank r*k, alpha*k), rsLoRA, rank/alpha patterns.
VARIANTS = {
    "sliced-rslora": ["--model.lora.targets", "[q,v,up,down]", "--model.lora.use_rslora", "true"],
    "all-linear-rslora": ["--model.lora.targets", "[all-linear]", "--model.lora.use_rslora", "true"],
    "qv-patterns": [
        "--model.lora.targets", "[q,v,o,down]", "--model.lora.rank_pattern", "{down_proj: 8}",
        "--model.lora.alpha_pattern", "{o_proj: 8}",
    ],
}  # fmt: skip


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data = root / "d.jsonl"
    data.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[:40]))
    main([
        "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.train_file", str(data),
        "--trainer.default_root_dir", str(root), "--trainer.max_steps", "6", "--data.max_length", "128",
        "--trainer.enable_progress_bar", "false", *VARIANTS[request.param],
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


def test_split_export_writes_its_base_and_points_at_it(trained, tmp_path):
    """On a stock Phi-3 base peft would silently drop q/k/v/gate/up: the split adapter names its own base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt, expected, _ = trained
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path), "--layout", "split"])
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "./base"
    base_path = read_adapter_config(str(tmp_path), "--adapter")["base_model_name_or_path"]  # relative to the folder
    assert Path(base_path) == (tmp_path / "base").resolve()
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    assert type(base).__name__ == "LlamaForCausalLM"
    model = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(apply_by_rule(base_path, tmp_path, "llama.cpp"), expected, atol=1e-4, rtol=0)


def test_merged_model_loads_without_peft(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, expected, _ = trained
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path), "--merge", "true"])
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


# ---------------------------------------------------------------------------- client scale rules
def apply_by_rule(base_path, adapter_dir, rule: str) -> torch.Tensor:
    """Logits of the base with the adapter added the way a client computes it, not the way peft does.

    llama.cpp: convert_lora_to_gguf.py keeps only the global lora_alpha; the runtime scales each tensor pair by
    alpha / (its rank) (llama_adapter_lora_weight::get_scale). vllm-global: vLLM releases before per-module
    patterns, one alpha / r from the global r (alpha / sqrt(r) with use_rslora) for every module. vLLM 0.34 applies
    the patterns per module as peft does: that rule is tested in tests/export/test_clients.py.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tensors = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(base_path).eval()
    weights = dict(model.named_parameters())
    pairs = 0
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")].float()
        if rule == "llama.cpp":
            scale = cfg["lora_alpha"] / b.shape[1]
        else:
            scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        with torch.no_grad():
            weights[name] += scale * b @ a.float()
        pairs += 1
    assert pairs
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("rule", ["llama.cpp", "vllm-global"])
def test_exported_adapter_is_exact_under_client_scale_rules(trained, tiny_path, tmp_path, rule):
    ckpt, expected, _ = trained
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path)])
    torch.testing.assert_close(apply_by_rule(tiny_path, tmp_path, rule), expected, atol=1e-4, rtol=0)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not cfg["alpha_pattern"] and not cfg["rank_pattern"] and not cfg["use_rslora"]


def test_raw_training_adapter_is_flagged_for_llama_cpp(trained):
    """The adapter fit saves keeps the training layout: the preflight must say llama.cpp would scale it wrongly."""
    _, _, root = trained
    report = preflight_adapter(root / "adapter")
    assert report["peft"][0]
    assert not report["llama.cpp"][0] and "wrongly" in report["llama.cpp"][1]
    with pytest.raises(ConfigError, match="--target llama.cpp"):
        refuse_if(report, "llama.cpp")


def test_preflight_names_vllm_rank_flag(trained, tmp_path, capsys):
    ckpt, _, _ = trained
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path), "--target", "vllm"])
    printed = capsys.readouterr().out
    rank = json.loads((tmp_path / "adapter_config.json").read_text())["r"]
    assert ("--max-lora-rank 32" in printed) == (rank == 32), printed
    assert "llama.cpp  yes" in printed


def test_modules_to_save_and_dora_are_refused_for_vllm_and_llama_cpp(tiny_path, tmp_path):
    from peft import get_peft_model

    from phi3lit.model.lora import LoraSpec, peft_config

    for i, spec in enumerate([LoraSpec(targets=["o"], modules_to_save=["lm_head"]), LoraSpec(use_dora=True)]):
        get_peft_model(base_model(tiny_path), peft_config(spec)).save_pretrained(tmp_path / str(i))
        report = preflight_adapter(tmp_path / str(i))
        assert report["peft"][0] and not report["vllm"][0] and not report["llama.cpp"][0]
        assert "--merge" in report["vllm"][1]
        for client in ("vllm", "llama.cpp"):
            with pytest.raises(ConfigError, match=f"--target {client}"):
                refuse_if(report, client)


# ---------------------------------------------------------------------------- files around the tensors
@pytest.mark.parametrize("trained", [next(iter(VARIANTS))], indirect=True)  # the LoRA layout does not matter here
def test_tokenizer_files_are_the_bases_bytes(trained, tiny_path, tmp_path):
    ckpt, _, _ = trained
    base_files = [n for n in TOKENIZER_FILES if (Path(tiny_path) / n).is_file()]
    assert "tokenizer.json" in base_files
    # The adapter export runs as a user runs it: online-mode settings are where a re-saved tokenizer_config.json
    # differs from the base's (it records local_files_only). The built-in base needs no network either way.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    cmd = [sys.executable, "-m", "phi3lit", "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "adapter")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "merged"), "--merge", "true"])
    for out in (tmp_path / "adapter", tmp_path / "merged"):
        for name in base_files:
            assert (out / name).read_bytes() == (Path(tiny_path) / name).read_bytes(), name
        assert not [n for n in TOKENIZER_FILES if (out / n).is_file() and n not in base_files]


def test_sentencepiece_model_is_copied(tiny_path, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py needs Phi-3's tokenizer.model; transformers 5 no longer writes it."""
    base = tmp_path / "base"
    base.mkdir()
    for name in TOKENIZER_FILES:
        if (Path(tiny_path) / name).is_file():
            (base / name).write_bytes((Path(tiny_path) / name).read_bytes())
    (base / "tokenizer.model").write_bytes(bytes(range(256)) * 8)  # opaque bytes: only their copy is checked
    (tmp_path / "out").mkdir()
    names = copy_tokenizer_files(str(base), tmp_path / "out")
    assert "tokenizer.model" in names
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()


def test_export_hygiene(trained, tmp_path):
    """Readable files, the public base name, a real model card, no warning about the frozen base weights."""
    from phi3lit.export.chat import load

    ckpt, expected, _ = trained
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path)])
    assert not [w for w in caught if "Found keys" in str(w.message)]
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "builtin:tiny-phi3"
    card = (tmp_path / "README.md").read_text()
    assert "base_model: builtin:tiny-phi3" in card and "More Information Needed" not in card
    assert "| steps | 6 " in card and "PeftModel.from_pretrained" in card and "llama.cpp" in card
    model, _ = load(str(tmp_path), None)  # phi3lit's chat resolves the builtin name
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- real clients (opt-in)
LLAMA_CPP = Path(os.environ.get("LLAMA_CPP_DIR", "/nonexistent"))


@pytest.mark.clients
@pytest.mark.skipif(
    not (LLAMA_CPP / "convert_lora_to_gguf.py").is_file(),
    reason="set LLAMA_CPP_DIR to a llama.cpp checkout (or llama-cpp-python's sdist vendor/llama.cpp)",
)
def test_llama_cpp_converter_output_reproduces_training(trained, tiny_path, tmp_path):
    """Runs llama.cpp's own converter and applies its runtime rule (alpha / rank) to the GGUF it wrote."""
    from transformers import AutoModelForCausalLM

    ckpt, expected, _ = trained
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "a")])
    env = dict(os.environ, PYTHONPATH=str(LLAMA_CPP / "gguf-py"))
    cmd = [sys.executable, str(LLAMA_CPP / "convert_lora_to_gguf.py"), "--base", tiny_path]
    cmd += ["--outfile", str(tmp_path / "a.gguf"), str(tmp_path / "a")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    names = {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj",
             "ffn_down": "mlp.down_proj"}  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    weights = dict(model.named_parameters())
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        _, layer, kind, _, _ = name.split(".")
        b = tensors[name[:-1] + "b"]
        with torch.no_grad():  # get_scale: alpha / b->ne[0], the rank
            weights[f"model.layers.{layer}.{names[kind]}.weight"] += alpha / b.shape[1] * b @ a
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=1e-4, rtol=0)
