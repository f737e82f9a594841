"""The files around an adapter's tensors: writing exports, the split form (reading one: `phi3lit.model.adapter`).

Every export carries the base's own tokenizer files byte for byte (llama.cpp's converter needs Phi-3's
sentencepiece `tokenizer.model`, which `save_pretrained` in transformers 5 no longer writes), the base's public name
(`base_model_name_or_path`), a model card, and files readable by other users (0644); it is staged in a temporary
folder and published by rename.

The split layout is the same adapter for the Llama layout (`q_proj`, ... `up_proj`), written together with the
matching split base (a `LlamaForCausalLM` with the same weights) that `base_model_name_or_path` names: on a stock
Phi-3 base, peft would silently skip the q/k/v/gate/up tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

from phi3lit.errors import ConfigError
from phi3lit.model.lora import FUSED, resolve_targets, slice_rows

# A split export's base_model_name_or_path: its base/ folder, relative so that the folder can be moved. "./" is
# never a hub id, so no client can mistake it for a model to download.
SPLIT_BASE = "./base"
SPLIT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "gate": "gate_proj", "up": "up_proj"}
# Files that make up a tokenizer in a Hugging Face model folder; copied from the base as they are.
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
)  # fmt: skip


def public_base_name(pretrained: str) -> str:
    """What `base_model_name_or_path` should say: the hub id or the user's path, never phi3lit's cache folder.

    `builtin:tiny-phi3` stays as it is (phi3lit's chat and predict resolve it); a relative local path becomes
    absolute so the adapter loads from any working directory.
    """
    from phi3lit.hub import BUILTIN_PREFIX

    if pretrained.startswith(BUILTIN_PREFIX):
        return pretrained
    if Path(pretrained).expanduser().is_dir():
        return str(Path(pretrained).expanduser().resolve())
    return pretrained


def _resolve(pretrained: str) -> str:
    from phi3lit.hub import resolve_pretrained

    return resolve_pretrained(pretrained)


def set_base_name(folder: Path, name: str) -> None:
    path = Path(folder) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def base_tokenizer_dir(pretrained: str) -> Path | None:
    """The folder holding the base's own tokenizer files: a local folder, or the hub snapshot in the HF cache."""
    local = Path(_resolve(pretrained)).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        # local_files_only: export never downloads; the base was loaded from this cache to build the module.
        return Path(snapshot_download(pretrained, local_files_only=True, allow_patterns=list(TOKENIZER_FILES)))
    except Exception:  # not a hub id, or not cached
        return None


def copy_tokenizer_files(pretrained: str, folder: Path, fallback=None) -> list[str]:
    """Copy the base's tokenizer files into `folder` unchanged; returns their names.

    Byte-identical copies, not `tokenizer.save_pretrained`: transformers 5 writes only tokenizer.json, and
    llama.cpp's converter needs Phi-3's sentencepiece tokenizer.model. Without a base folder (an uncached hub id)
    `fallback.save_pretrained` is used when given, with a note.
    """
    source = base_tokenizer_dir(pretrained)
    names = [n for n in TOKENIZER_FILES if source is not None and (source / n).is_file()]
    for name in names:
        shutil.copyfile(source / name, Path(folder) / name)  # copyfile: content only, normal permissions
    if not names:
        if fallback is None:
            raise ConfigError(f"model.pretrained={pretrained}: no tokenizer files found to copy into the export")
        print(f"[phi3lit] note: no local tokenizer files for {pretrained}; re-saving the loaded tokenizer instead")
        fallback.save_pretrained(folder)
    return names


def fix_permissions(folder: Path) -> None:
    """Files readable by everyone allowed by the umask (0644 usually): safetensors writes 0600, which a server
    running as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def publish(stage: Path, out_dir: Path) -> None:
    fix_permissions(stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in stage.iterdir():
        target = out_dir / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)


def _training_rows(checkpoint: dict, module) -> list[str]:
    """The model card rows every export shares: base, data, steps and the LoRA settings it was trained with."""
    from dataclasses import asdict

    spec = asdict(module.lora)
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    return [
        "| | |",
        "| --- | --- |",
        f"| base model | `{public_base_name(module.hparams.pretrained)}` |",
        f"| training data | `{data.get('train_file', 'unknown')}` (split `{data.get('split', '-')}`) |",
        f"| max length | {data.get('max_length', '-')} |",
        f"| steps | {checkpoint.get('global_step', 'unknown')} (epoch {checkpoint.get('epoch', '-')}) |",
        f"| LoRA targets | {', '.join(map(str, spec['targets']))} |",
        f"| r / alpha / dropout (training) | {spec['r']} / {spec['alpha']} / {spec['dropout']} |",
        f"| rsLoRA / DoRA / init | {spec['use_rslora']} / {spec['use_dora']} / {spec['init']} |",
        f"| bias (training) | {spec['bias']} |",
        f"| rank / alpha patterns (training) | {spec['rank_pattern'] or '-'} / {spec['alpha_pattern'] or '-'} |",
        f"| modules_to_save | {spec['modules_to_save'] or '-'} |",
    ]


def _end_rows(checkpoint: dict, report: dict) -> list[str]:
    metrics = _metrics(checkpoint)
    lines = [f"| {k} | {v:.4g} |" for k, v in metrics.items()] or ["| final metrics | none in the checkpoint |"]
    lines += ["", "## Clients", ""]
    return lines + [f"- **{c}**: {'yes' if ok else 'no'}: {why}" for c, (ok, why) in report.items()]


def write_card(folder: Path, checkpoint: dict, module, report: dict, layout: str = "fused", raw: bool = False) -> None:
    """README.md: a model card with the base, data, LoRA settings, steps, metrics, clients and how to load it."""
    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    base = public_base_name(module.hparams.pretrained)
    lines = ["---", f"base_model: {base}", "library_name: peft", "tags: [lora, phi3lit]", "---", ""]
    lines += [
        f"# LoRA adapter for {base}",
        "",
        f"Trained with phi3lit; {'written by `phi3lit export`' if not raw else 'saved at the end of `fit`'}.",
        "",
        *_training_rows(checkpoint, module),
        f"| layout | {layout}{' (Llama-style names; base in `base/`)' if layout == 'split' else ''} |",
        f"| written as | r={cfg['r']}, lora_alpha={cfg['lora_alpha']}, rank_pattern={cfg.get('rank_pattern') or '-'}, "
        f"alpha_pattern={cfg.get('alpha_pattern') or '-'}, use_rslora={cfg.get('use_rslora')}, "
        f"bias={cfg.get('bias')} |",
        *_end_rows(checkpoint, report),
    ]
    if not raw:
        lines += [
            "",
            "The adapter is written so that every module has one rank and the scale `lora_alpha / r`: peft, vLLM "
            "and llama.cpp compute the same function (phi3lit checked every module when exporting).",
        ]
    split = layout == "split"
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'base = AutoModelForCausalLM.from_pretrained(f"{ADAPTER_DIR}/base")  # the split base beside the adapter'
        if split
        else f"base = AutoModelForCausalLM.from_pretrained(BASE)  # `{base}`",
        "model = PeftModel.from_pretrained(base, ADAPTER_DIR)",
        "tokenizer = AutoTokenizer.from_pretrained(ADAPTER_DIR)  # the base's own tokenizer files",
        "```",
        "",
        "or `python -m phi3lit chat --adapter ADAPTER_DIR` (`builtin:` bases are resolved by phi3lit).",
    ]
    if split:
        lines += [
            "",
            f"`base_model_name_or_path` is `{SPLIT_BASE}`, relative to this folder, so the folder can be moved whole. "
            "phi3lit resolves it against the adapter folder; peft's `AutoPeftModelForCausalLM` passes it to "
            "`from_pretrained` as it is, so run that from inside this folder, or load `base/` yourself as above.",
        ]
    (folder / "README.md").write_text("\n".join([*lines, ""]))


def write_merged_card(folder: Path, checkpoint: dict, module, report: dict, layout: str, dtype: str) -> None:
    """README.md for `export --merge`: what the folder is (the base with the LoRA update folded in), the base,
    the LoRA settings it was trained with, and how to load it with transformers alone."""
    folder = Path(folder)
    base = public_base_name(module.hparams.pretrained)
    arch = "LlamaForCausalLM, Llama-style split names" if layout == "split" else "Phi3ForCausalLM"
    lines = ["---", f"base_model: {base}", "library_name: transformers", "tags: [lora, merged, phi3lit]", "---", ""]
    lines += [
        f"# {base} with a LoRA fine-tune merged in",
        "",
        "Trained with phi3lit and written by `phi3lit export --merge`: a full model whose weights are the base's "
        "plus the trained LoRA update (W + scale * B A), so it needs no peft and no adapter.",
        "",
        *_training_rows(checkpoint, module),
        f"| architecture | {arch} |",
        f"| dtype | {dtype} |",
        *_end_rows(checkpoint, report),
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)",
        "tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)  # the base's own tokenizer files",
        "```",
        "",
        "or `python -m phi3lit chat --model MODEL_DIR`, or `--model.pretrained MODEL_DIR` for `predict` and `fit`.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))


def _metrics(checkpoint: dict) -> dict[str, float]:
    """Final metrics a checkpoint carries: phi3lit's own record if the run saved one, else ModelCheckpoint's."""
    found = {}
    for key, value in ((checkpoint.get("phi3lit") or {}).get("metrics") or {}).items():
        found[key] = float(value)
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor"):
            for field in ("current_score", "best_model_score"):
                if state.get(field) is not None:
                    found[f"{state['monitor']} ({field.replace('_', ' ')})"] = float(state[field])
    return found


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
