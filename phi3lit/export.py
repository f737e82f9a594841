"""Export a trained run: a stock peft adapter (fused or split layout), or a merged full model.

`python -m phi3lit export --ckpt runs/x/checkpoints/last.ckpt --out DIR [--merge] [--layout fused|split]
[--dtype fp32|bf16|fp16]`

* fused: the adapter as peft saves it for stock `Phi3ForCausalLM` (`qkv_proj`, `gate_up_proj`). Slice
  targets are already ordinary peft LoRA layers with zero rows where a slice is off (see lora.py), so stock
  peft reproduces them exactly.
* split: the same adapter rewritten for the Llama layout (`q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj`)
  that some loaders (vLLM, for a while) expect for Phi-3. Because LoRA's update is B A x, taking the rows of B
  that belong to q (and, for a slice target, only the columns of A that feed them) is exact arithmetic: the
  split adapter on a split copy of the base computes the same function (tested). `split_base` makes that copy.
* merge: W + scale * B A folded into the weights, saved with `save_pretrained` (safetensors) and the tokenizer:
  a model folder that `AutoModelForCausalLM.from_pretrained` loads with no peft at all.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Literal

import torch

from phi3lit.checkpoint import read_checkpoint
from phi3lit.errors import ConfigError
from phi3lit.lora import FUSED, resolve_targets, slice_rows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPLIT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "gate": "gate_proj", "up": "up_proj"}


def export(
    ckpt: str,
    out: str,
    merge: bool = False,
    layout: Literal["fused", "split"] = "fused",
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
) -> Path:
    """Export a phi3lit Lightning checkpoint.

    Args:
        ckpt: a `.ckpt` written by `python -m phi3lit fit` (LoRA tensors; the base comes from its config).
        out: output folder.
        merge: write a full model with the adapter folded into the weights instead of an adapter.
        layout: `fused` for stock Phi-3 module names, `split` for q_proj/k_proj/v_proj/gate_proj/up_proj.
        dtype: dtype of the written tensors.
    """
    from phi3lit.model import Phi3LoRA

    path = Path(ckpt)
    read_checkpoint(path)  # a missing or damaged file is explained here, naming it
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder (it is created if missing)")
    # A QLoRA run merges onto the unquantized base, as users expect: the 4-bit base is only a training device.
    module = Phi3LoRA.load_from_checkpoint(path, map_location="cpu", quantization=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model = module.model
    if merge:
        merged = peft_model.merge_and_unload()
        if layout == "split":
            merged = split_base(merged)
        merged.to(DTYPES[dtype]).save_pretrained(out_dir, safe_serialization=True)
    else:
        peft_model.to(DTYPES[dtype]).save_pretrained(out_dir)
        if layout == "split":
            split_adapter(out_dir, peft_model.get_base_model().config, module.lora)
    module.tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------- split layout
def split_adapter(folder: Path, config, spec) -> None:
    """Rewrite a fused peft adapter folder in place into the split (Llama-style) layout."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "adapter_model.safetensors")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    plan = resolve_targets(spec.targets)
    scale_of = {m: _scale(cfg, m) for m in FUSED}
    out, ranks, alphas = {}, {}, {}
    pattern = re.compile(r"^(.*)\.(qkv_proj|gate_up_proj)\.(lora_A|lora_B|lora_magnitude_vector)(.*)$")
    for key, tensor in weights.items():
        m = pattern.match(key)
        if not m:
            out[key] = tensor
            continue
        prefix, fused, kind, suffix = m.groups()
        enabled = plan.get(fused) or FUSED[fused]
        rows = slice_rows(config, fused)
        fused_rank = cfg.get("rank_pattern", {}).get(fused, cfg["r"])
        for part in FUSED[fused]:
            if part not in enabled:
                continue  # an off slice has no adapter at all in the split layout
            lo, hi = rows[part]
            # A sliced module's slice j only uses its own block of r columns; a whole module uses all of A.
            j = enabled.index(part)
            cols = slice(j * spec.r, (j + 1) * spec.r) if plan.get(fused) else None
            name = f"{prefix}.{SPLIT_NAMES[part]}.{kind}{suffix}"
            if kind == "lora_A":
                out[name] = (tensor[cols] if cols else tensor).clone()  # own storage: safetensors forbids sharing
            elif kind == "lora_B":
                out[name] = (tensor[lo:hi, cols] if cols else tensor[lo:hi]).contiguous()
            else:  # DoRA magnitude: one per output row
                out[name] = tensor[lo:hi].contiguous()
            r_new = spec.r if cols else fused_rank
            ranks[SPLIT_NAMES[part]] = r_new
            # Keep each split module's scale equal to the fused one: alpha' = scale * r' (or * sqrt(r')).
            root = math.sqrt(r_new) if cfg.get("use_rslora") else r_new
            alphas[SPLIT_NAMES[part]] = scale_of[fused] * root
    targets = set(cfg["target_modules"]) - set(FUSED)
    targets |= {SPLIT_NAMES[p] for f in FUSED if f in plan for p in (plan[f] or FUSED[f])}
    cfg["target_modules"] = sorted(targets)
    cfg["rank_pattern"] = {k: v for k, v in cfg.get("rank_pattern", {}).items() if k not in FUSED} | ranks
    cfg["alpha_pattern"] = {k: v for k, v in cfg.get("alpha_pattern", {}).items() if k not in FUSED} | alphas
    save_file(out, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _scale(cfg: dict, module: str) -> float:
    r = cfg.get("rank_pattern", {}).get(module, cfg["r"])
    alpha = cfg.get("alpha_pattern", {}).get(module, cfg["lora_alpha"])
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def split_base(phi3):
    """A `LlamaForCausalLM` with the same weights as a (merged or base) `Phi3ForCausalLM`.

    Phi-3 is Llama with q/k/v and gate/up fused row-wise, so splitting rows is exact. Phi-3's sliding window
    (2047 for the 4k model) has no Llama equivalent: the copy matches for sequences within the window.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    c = phi3.config
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})  # v5 / v4 names
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    if rope.get("rope_type", rope.get("type", "default")) != "default" or partial != 1.0:
        raise ValueError("split_base supports Phi-3 models with plain full RoPE (e.g. Phi-3-mini-4k), not " + str(rope))
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=theta,
        tie_word_embeddings=c.tie_word_embeddings, hidden_act=c.hidden_act,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )  # fmt: skip
    llama = LlamaForCausalLM(config).to(phi3.dtype)
    sd = {}
    for key, value in phi3.state_dict().items():
        if key.endswith("qkv_proj.weight"):
            rows = slice_rows(c, "qkv_proj")
            for part in ("q", "k", "v"):
                sd[key.replace("qkv_proj", SPLIT_NAMES[part])] = value[slice(*rows[part])]
        elif key.endswith("gate_up_proj.weight"):
            rows = slice_rows(c, "gate_up_proj")
            for part in ("gate", "up"):
                sd[key.replace("gate_up_proj", SPLIT_NAMES[part])] = value[slice(*rows[part])]
        else:
            sd[key] = value
    llama.load_state_dict(sd, strict=True)
    return llama
