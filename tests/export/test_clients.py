"""export, client by client (#25 item 5): vLLM's `bias` check, vLLM 0.34's per-module rank/alpha patterns, a split
export that can be moved, and the merged model's card. Each artifact is loaded in the client that reads it."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, run_main

from phi3lit.export.clients import preflight_adapter
from phi3lit.model.module import Phi3LoRA

IDS = torch.tensor([[7, 20, 30, 40, 50, 60, 6, 3, 100, 200, 300, 400]])
# Scales that differ between vLLM's per-module rule and a single global alpha / r: slices, rsLoRA, a rank pattern.
PATTERNED = ["--model.lora.targets", "[q,v,o,down]", "--model.lora.use_rslora", "true"]
PATTERNED += ["--model.lora.rank_pattern", "{down_proj: 8}"]


def fit(root: Path, data: Path, *args: str) -> tuple[Path, torch.Tensor]:
    """A 6-step tiny fit through the CLI; its last checkpoint and the trained module's logits on IDS."""
    run_main(["fit", "--config", TINY, "--data.train_file", str(data), "--trainer.default_root_dir", str(root),
              "--trainer.max_steps", "6", "--data.max_length", "128", *args])  # fmt: skip
    ckpt = root / "checkpoints" / "last.ckpt"
    with torch.no_grad():
        return ckpt, Phi3LoRA.load_from_checkpoint(ckpt).eval().model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def patterned(tmp_path_factory, small_data):
    root = tmp_path_factory.mktemp("patterned")
    return (*fit(root, small_data, *PATTERNED), root)


@pytest.fixture(scope="module")
def biased(tmp_path_factory, small_data):
    root = tmp_path_factory.mktemp("biased")
    return (*fit(root, small_data, "--model.lora.bias", "all", "--model.lora.targets", "[q,v]"), root)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def card_code(folder: Path) -> str:
    """The Python block of a folder's model card, as a user would paste it."""
    return re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)


def vllm_rule(base_path, adapter_dir) -> torch.Tensor:
    """Logits of the base with the adapter added as vLLM 0.34 does (vllm/lora/peft_helper.py, read in its wheel).

    `PEFTHelper.get_rank_and_scaling(name)`: the name without `base_model.model.`; rank_pattern and alpha_pattern
    keys match a "."-bounded suffix of it (`re.match(rf"(.*\\.)?({key})$", name)`, first match wins), else r and
    lora_alpha; scale alpha / r, or alpha / sqrt(r) with use_rslora. `validate_legal` rejects bias != "none".
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    assert cfg["bias"] == "none" and not cfg.get("use_dora") and not cfg.get("modules_to_save")

    def match(pattern: dict, name: str):
        return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), None)

    tensors = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(base_path).eval()
    weights = dict(model.named_parameters())
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            r = match(cfg.get("rank_pattern") or {}, name) or cfg["r"]
            alpha = match(cfg.get("alpha_pattern") or {}, name) or cfg["lora_alpha"]
            scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
            with torch.no_grad():
                weights[name + ".weight"] += scale * tensors[key.replace(".lora_A.", ".lora_B.")].float() @ a.float()
    return logits(model)


def test_bias_all_adapter_holds_no_bias_and_is_exported_as_none(biased, tiny_path, tmp_path):
    """vLLM rejects "bias" != "none". Phi-3 has no bias parameter, so a bias: all adapter holds no bias tensor and
    writing "none" is exact: the raw adapter is refused for vLLM, the export loads in peft and under vLLM's rule."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ckpt, expected, root = biased
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert not [n for n, _ in base.named_parameters() if "bias" in n]  # every Phi-3 Linear is bias=False
    assert json.loads((root / "adapter" / "adapter_config.json").read_text())["bias"] == "all"
    assert not [k for k in load_file(root / "adapter" / "adapter_model.safetensors") if "bias" in k]
    ok, why = preflight_adapter(root / "adapter")["vllm"]
    assert not ok and "bias 'all'" in why and "phi3lit export" in why, why

    out = run_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path), "--target", "vllm"])
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bias"] == "none", out
    assert "bias=none" in (tmp_path / "README.md").read_text()
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, tmp_path)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(vllm_rule(tiny_path, tmp_path), expected, atol=1e-4, rtol=0)


def test_raw_adapter_with_patterns_is_exact_in_vllm(patterned, tiny_path):
    """The adapter fit writes keeps rank_pattern/alpha_pattern/rsLoRA; vLLM 0.34 applies them per module as peft
    does, so the preflight says vLLM takes it (llama.cpp still does not), and vLLM's rule gives the trained logits."""
    _, expected, root = patterned
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"] and cfg["use_rslora"]  # the case where the rules differ
    report = preflight_adapter(root / "adapter")
    assert report["vllm"][0] and "per module" in report["vllm"][1], report["vllm"]
    assert not report["llama.cpp"][0]
    torch.testing.assert_close(vllm_rule(tiny_path, root / "adapter"), expected, atol=1e-4, rtol=0)


def test_split_export_can_be_moved(patterned, tmp_path, monkeypatch):
    """The split folder names its base relative to itself: moved whole, it loads in stock peft
    (AutoPeftModelForCausalLM from inside it), by its model card's code, and in phi3lit's chat."""
    from peft import AutoPeftModelForCausalLM

    from phi3lit.export.chat import load

    ckpt, expected, _ = patterned
    run_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "made"), "--layout", "split"])
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(tmp_path / "made", moved)
    assert json.loads((moved / "adapter_config.json").read_text())["base_model_name_or_path"] == "./base"

    monkeypatch.chdir(moved)
    torch.testing.assert_close(
        logits(AutoPeftModelForCausalLM.from_pretrained(str(moved))), expected, atol=1e-5, rtol=0
    )
    monkeypatch.chdir(tmp_path)
    scope = {"ADAPTER_DIR": str(moved)}
    exec(card_code(moved), scope)  # noqa: S102 (the card's own loading code, as a user pastes it)
    torch.testing.assert_close(logits(scope["model"]), expected, atol=1e-5, rtol=0)
    model, _ = load(str(moved), None)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


def test_merged_export_has_a_model_card(patterned, tmp_path):
    """`export --merge` writes a card: what the folder is, the base, the LoRA settings, and transformers code that
    loads it (run here as written)."""
    ckpt, expected, _ = patterned
    run_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path), "--merge", "true"])
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nbase_model: builtin:tiny-phi3\nlibrary_name: transformers\n"), card[:200]
    assert "merged" in card and "| steps | 6 " in card and "| LoRA targets | q, v, o, down |" in card
    assert "| rsLoRA / DoRA / init | True / False / default |" in card and "{'down_proj': 8}" in card
    scope = {"MODEL_DIR": str(tmp_path)}
    exec(card_code(tmp_path), scope)  # noqa: S102 (the card's own loading code, as a user pastes it)
    torch.testing.assert_close(logits(scope["model"]), expected, atol=1e-4, rtol=0)
    assert scope["tokenizer"].convert_tokens_to_ids("<|end|>") > 0


def test_a_relative_base_that_is_a_link_is_not_followed(patterned, tmp_path, capsys):
    """`./base` is resolved only to a real folder beside the adapter: a link there was not made by phi3lit."""
    from helpers import explain

    ckpt, _, _ = patterned
    run_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "a"), "--layout", "split"])
    (tmp_path / "a" / "base").rename(tmp_path / "elsewhere")
    (tmp_path / "a" / "base").symlink_to(tmp_path / "elsewhere")
    capsys.readouterr()  # the export's own output
    err = explain(capsys, ["chat", "--adapter", str(tmp_path / "a")])
    assert "base_model_name_or_path './base' is not a folder beside the adapter" in err, err
    assert len(err.strip().splitlines()) == 1
