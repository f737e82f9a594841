"""Export a trained run: a peft adapter that every client reads the same way (fused or split layout), or a
merged full model.

`python -m phi3lit export --ckpt runs/x/checkpoints/last.ckpt --out DIR [--merge] [--layout fused|split]
[--dtype fp32|bf16|fp16] [--target any|peft|vllm|llama.cpp]`

One contract: the written adapter means the same thing in stock peft, vLLM and llama.cpp. They disagree on
scales. peft scales each module by its own alpha / r (rank_pattern, alpha_pattern) or alpha / sqrt(r)
(rsLoRA); llama.cpp's converter keeps only the global `lora_alpha` and its runtime uses alpha / (that tensor's
rank); vLLM uses one global alpha / r (or alpha / sqrt(r)) for every module and ignores both patterns. A
phi3lit slice target ([q, v]) is a rank r*k module with alpha*k, so a raw adapter is exact in peft only. The
export therefore rewrites it into the one form all three rules agree on: every module padded with zero rows of
A / columns of B to one rank R (exact: zero rank components add nothing), each module's true scale folded into
its B so that alpha' / R is the scale everywhere, and no rank_pattern, alpha_pattern or rsLoRA left. Every
module is then checked against the training module under each client's rule, and the export fails if one is
not exact.

* fused: stock `Phi3ForCausalLM` names (`qkv_proj`, `gate_up_proj`).
* split: the same adapter for the Llama layout (`q_proj`, ... `up_proj`), written together with the matching
  split base in `DIR/base` (a `LlamaForCausalLM` with the same weights) that `base_model_name_or_path` names:
  on a stock Phi-3 base, peft would silently skip the q/k/v/gate/up tensors.
* merge: W + scale * B A folded into the weights, saved with `save_pretrained` (safetensors): a model folder
  that `AutoModelForCausalLM.from_pretrained`, vLLM and llama.cpp's `convert_hf_to_gguf.py` load.

Every export carries the base's own tokenizer files byte for byte (llama.cpp's converter needs Phi-3's
sentencepiece `tokenizer.model`, which `save_pretrained` in transformers 5 no longer writes), a model card,
and files readable by other users. A preflight report says which clients take the result, and why not.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Literal

import torch

from phi3lit.checkpoint import read_checkpoint
from phi3lit.errors import ConfigError
from phi3lit.lora import FUSED, resolve_targets, slice_rows, untie_for_merge

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPLIT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "gate": "gate_proj", "up": "up_proj"}
# Files that make up a tokenizer in a Hugging Face model folder; copied from the base as they are.
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
)  # fmt: skip
CLIENTS = ("peft", "vllm", "llama.cpp")
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}  # relative, per dtype written
Target = Literal["any", "peft", "vllm", "llama.cpp"]


class ExportMismatch(RuntimeError):
    """A written adapter would not compute the trained function in some client: a bug in the export, not input."""


def export(
    ckpt: str,
    out: str,
    merge: bool = False,
    layout: Literal["fused", "split"] = "fused",
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    target: Target = "any",
) -> Path:
    """Export a phi3lit Lightning checkpoint.

    Args:
        ckpt: a `.ckpt` written by `python -m phi3lit fit` (LoRA tensors; the base comes from its config).
        out: output folder.
        merge: write a full model with the adapter folded into the weights instead of an adapter.
        layout: `fused` for stock Phi-3 module names; `split` for q_proj/k_proj/v_proj/gate_proj/up_proj, with
            the matching split (Llama-layout) base written to `out/base`.
        dtype: dtype of the written tensors.
        target: the client that will load the result (`peft`, `vllm`, `llama.cpp`): the export refuses, before
            anything is written to `out`, when that client cannot take it. `any` only reports.
    """
    path = Path(ckpt)
    checkpoint = read_checkpoint(path)  # a missing or damaged file is explained here, naming it
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder (it is created if missing)")
    if target not in ("any", *CLIENTS):
        raise ConfigError(f"--target {target}: use one of any, {', '.join(CLIENTS)}")
    module = load_module(path)
    spec, pretrained = module.lora, module.hparams.pretrained
    if layout == "split" and not merge and spec.init in ("pissa", "olora"):
        raise ConfigError(
            f"--layout split: a {spec.init} adapter only fits the base its init rewrote; use --merge --layout split"
        )
    peft_model = module.model
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written to a staging folder first, so a refused or failed export leaves `out` as it was.
    stage = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.export-"))
    try:
        if merge:
            untie_for_merge(peft_model)  # tied embeddings (Phi-4-mini): LoRA on lm_head/embed must stay on one use
            merged = peft_model.merge_and_unload()
            if layout == "split":
                merged = split_base(merged)
            merged.to(DTYPES[dtype]).save_pretrained(stage, safe_serialization=True)
            copy_tokenizer_files(pretrained, stage)
            report = preflight_merged(stage, layout)
        else:
            write_adapter(peft_model, stage, pretrained, DTYPES[dtype], layout=layout, spec=spec)
            report = preflight_adapter(stage, layout=layout)
        print(format_report(report, out_dir))
        refuse_if(report, target)
        if not merge:
            if layout == "split":
                base = peft_model.unload()  # the base weights without LoRA; the adapter is already written
                split_base(base).to(DTYPES[dtype]).save_pretrained(stage / "base", safe_serialization=True)
                copy_tokenizer_files(pretrained, stage / "base")
                _set_base_name(stage, str((out_dir / "base").resolve()))
            write_card(stage, checkpoint, module, report, layout=layout)
        _publish(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def finish_adapter_folder(out_dir, module, checkpoint: dict | None = None) -> dict:
    """Give an adapter folder that `peft_model.save_pretrained` just wrote the export's treatment, in place.

    For the adapter `fit` saves (callbacks.SaveAdapter): the base's tokenizer files instead of a re-saved
    tokenizer, the public base name (never a cache path), a model card with the preflight report, normal file
    permissions. The tensors stay in the training layout, so `model.adapter=<run>/adapter` (predict, test, more
    training) keeps working; the report says when a client needs `phi3lit export` instead. Returns the report.
    """
    out_dir = Path(out_dir)
    pretrained = module.hparams.pretrained
    _set_base_name(out_dir, public_base_name(pretrained))
    for name in TOKENIZER_FILES:  # save_pretrained's versions may differ from the base's: replace them all
        (out_dir / name).unlink(missing_ok=True)
    copy_tokenizer_files(pretrained, out_dir, fallback=module.tokenizer)
    report = preflight_adapter(out_dir, layout="fused")
    write_card(out_dir, checkpoint or {}, module, report, layout="fused", raw=True)
    fix_permissions(out_dir)
    return report


def load_module(path: Path):
    """The training module from a checkpoint, without Lightning's "Found keys ... not in the checkpoint" warning.

    Checkpoints hold only the trainable LoRA tensors by design (Phi3LoRA.on_save_checkpoint), so every frozen
    base weight is "missing" and Lightning warns about all of them. `Phi3LoRA.on_load_checkpoint` raises when a
    trainable tensor is missing, so only that warning is dropped; unexpected keys are still reported.
    """
    from phi3lit.model import Phi3LoRA

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the")
        # A QLoRA run merges onto the unquantized base, as users expect: the 4-bit base is only a training device.
        return Phi3LoRA.load_from_checkpoint(path, map_location="cpu", quantization=None)


# ---------------------------------------------------------------------------- the adapter contract
def write_adapter(peft_model, folder: Path, pretrained: str, dtype, layout: str = "fused", spec=None) -> None:
    """Write the adapter of `peft_model` to `folder` in the form every client reads alike, and verify it."""
    from safetensors.torch import load_file, save_file

    peft_model.save_pretrained(folder)  # fp32 tensors: folding happens before any rounding to `dtype`
    _set_base_name(folder, public_base_name(pretrained))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    reference = reference_modules(peft_model)
    if layout == "split":
        split_adapter(folder, peft_model.get_base_model().config, spec)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
        # The split rewrite is exact under peft's rule (tested against the fused model), so it is the reference.
        reference = {p: (peft_scale(cfg, p), a, b) for p, (a, b) in lora_pairs(tensors).items()}
    if cfg.get("init_lora_weights") not in ("pissa", "olora"):
        # PiSSA/OLoRA adapters stay as peft wrote them: peft redoes their init on the base at load time, from
        # r and alpha, so changing those would change the base it rebuilds. Only peft can load them anyway.
        tensors, cfg = portable(tensors, cfg, {p: s for p, (s, _, _) in reference.items()})
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    bad = verify(load_file(folder / "adapter_model.safetensors"), cfg, reference, dtype)
    wrong = {m: rules for m, rules in bad.items() if {"peft", "llama.cpp"} & set(rules)}
    if wrong and cfg.get("init_lora_weights") not in ("pissa", "olora"):
        raise ExportMismatch(f"the written adapter is not exact for {len(wrong)} modules: {_first(wrong)}")
    copy_tokenizer_files(pretrained, folder)


def lora_pairs(tensors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module key prefix: (A, B)} for the LoRA tensors of a peft state dict (Linear and Embedding layers)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.match(r"^(.*)\.lora_(A|B)\.weight$", key) or re.match(r"^(.*)\.lora_embedding_(A|B)$", key)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = t
    return {p: (d["A"], d["B"]) for p, d in parts.items() if "A" in d and "B" in d}


def _pair_keys(tensors: dict, prefix: str) -> tuple[str, str]:
    if f"{prefix}.lora_A.weight" in tensors:
        return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
    return f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"


def reference_modules(peft_model) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """{saved key prefix: (scale, A, B)} as the training module computes them: the ground truth of an export."""
    out = {}
    for name, layer in peft_model.named_modules():
        scaling = getattr(layer, "scaling", None)
        if not isinstance(scaling, dict) or "default" not in scaling:
            continue
        if "default" in getattr(layer, "lora_A", {}):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        elif "default" in getattr(layer, "lora_embedding_A", {}):
            a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        else:
            continue
        out[name] = (float(scaling["default"]), a.detach().float().cpu(), b.detach().float().cpu())
    return out


def peft_scale(cfg: dict, prefix: str) -> float:
    """The scale stock peft gives module `prefix`: its own alpha / r from the patterns, or / sqrt(r) for rsLoRA."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(ranks.keys(), prefix), cfg["r"])
    alpha = alphas.get(get_pattern_key(alphas.keys(), prefix), cfg["lora_alpha"])
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def client_scales(cfg: dict, prefix: str, rank: int) -> dict[str, float]:
    """The scale each client applies to module `prefix` whose tensors have rank `rank`.

    llama.cpp: `convert_lora_to_gguf.py` keeps only `lora_alpha`; `llama_adapter_lora_weight::get_scale` uses
    alpha / (rank of that tensor). vLLM: `PEFTHelper` computes one alpha / r (alpha / sqrt(r) with rsLoRA) from
    the global r for all modules and ignores rank_pattern and alpha_pattern.
    """
    root = math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"]
    return {"peft": peft_scale(cfg, prefix), "llama.cpp": cfg["lora_alpha"] / rank, "vllm": cfg["lora_alpha"] / root}


def portable(tensors: dict, cfg: dict, scales: dict[str, float]) -> tuple[dict, dict]:
    """The adapter rewritten so that peft's, llama.cpp's and vLLM's scale rules all give each module its scale.

    Every module is padded to the largest rank R (zero rows of A, zero columns of B: B A is unchanged) and its
    true scale s is folded into B as s / (alpha' / R). alpha' is chosen so that the most common scale needs no
    folding: a plain adapter (one rank, no patterns, no rsLoRA) is written unchanged.
    """
    pairs = lora_pairs(tensors)
    if not pairs:
        return tensors, cfg
    rank = max(a.shape[0] for a, _ in pairs.values())
    common = Counter(round(scales[p], 12) for p in pairs).most_common(1)[0][0]
    alpha = common * rank
    alpha = float(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha
    out = dict(tensors)
    for prefix, (a, b) in pairs.items():
        key_a, key_b = _pair_keys(tensors, prefix)
        factor = scales[prefix] / (alpha / rank)
        if factor != 1.0:
            b = (b.double() * factor).to(b.dtype)
        pad = rank - a.shape[0]
        if pad:
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
        out[key_a], out[key_b] = a.contiguous(), b.contiguous()
    cfg = dict(cfg, r=rank, lora_alpha=alpha, rank_pattern={}, alpha_pattern={}, use_rslora=False)
    return out, cfg


def verify(tensors: dict, cfg: dict, reference: dict, dtype=torch.float32) -> dict[str, list[str]]:
    """{module: [clients whose rule does not reproduce it]} for a written adapter against `reference`.

    For each module, the written A must be the trained A (plus zero padding) and `scale * B` under each client's
    rule must equal the trained scale * B, to the rounding of the written dtype.
    """
    tol = TOLERANCE.get(dtype, 1e-5)
    pairs = lora_pairs(tensors)
    bad: dict[str, list[str]] = {}
    for prefix in set(reference) | set(pairs):
        if prefix not in pairs or prefix not in reference:
            bad[prefix] = list(CLIENTS)  # a module lost or invented: wrong everywhere
            continue
        scale, a_ref, b_ref = reference[prefix]
        a, b = (t.float() for t in pairs[prefix])
        r = a_ref.shape[0]
        shape_ok = a.shape[0] >= r and a.shape[1:] == a_ref.shape[1:] and b.shape[0] == b_ref.shape[0]
        if not shape_ok or a[r:].any() or b[:, r:].any() or not _close(a[:r], a_ref, tol):
            bad[prefix] = list(CLIENTS)
            continue
        for client, s in client_scales(cfg, prefix, a.shape[0]).items():
            if not _close(s * b[:, :r], scale * b_ref, tol):
                bad.setdefault(prefix, []).append(client)
    return bad


def _close(x: torch.Tensor, y: torch.Tensor, tol: float) -> bool:
    return bool(((x - y).abs() <= tol * y.abs().max().clamp_min(1e-12) + tol * y.abs()).all())


def _first(bad: dict) -> str:
    key = sorted(bad)[0]
    return f"{key} ({', '.join(bad[key])}){' and more' if len(bad) > 1 else ''}"


# ---------------------------------------------------------------------------- which client takes it
def preflight_adapter(folder: Path, layout: str = "fused") -> dict[str, tuple[bool, str]]:
    """{client: (accepts, why)} for an adapter folder, from its config and tensors (rules as in client_scales)."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    tensors = load_file(Path(folder) / "adapter_model.safetensors")
    pairs = lora_pairs(tensors)
    ranks = {a.shape[0] for a, _ in pairs.values()}
    # Clients that use other scale rules than peft's: which modules would they scale differently?
    off = {c: [] for c in ("vllm", "llama.cpp")}
    for prefix, (a, _) in pairs.items():
        scales = client_scales(cfg, prefix, a.shape[0])
        for c in off:
            if not math.isclose(scales[c], scales["peft"], rel_tol=1e-6):
                off[c].append(prefix)
    blockers = []
    if cfg.get("modules_to_save"):
        blockers.append(f"modules_to_save {cfg['modules_to_save']}")
    if cfg.get("use_dora"):
        blockers.append("DoRA")
    if cfg.get("init_lora_weights") in ("pissa", "olora"):
        blockers.append(f"{cfg['init_lora_weights']} init (the adapter belongs to a rewritten base)")
    report = {}
    if layout == "split":
        report["peft"] = (True, "on the split base in base/ (named by base_model_name_or_path); on a stock Phi-3 "
                          "base peft would silently skip q/k/v/gate/up")  # fmt: skip
    elif cfg.get("init_lora_weights") in ("pissa", "olora"):
        report["peft"] = (True, f"peft redoes the {cfg['init_lora_weights']} init on the base while loading (slow)")
    else:
        report["peft"] = (True, "PeftModel.from_pretrained on the stock base")
    for client in ("vllm", "llama.cpp"):
        if blockers:
            report[client] = (False, f"{client} rejects {', '.join(blockers)}; export with --merge")
        elif off[client]:
            report[client] = (False, f"{client} would scale {len(off[client])} modules wrongly (e.g. "
                              f"{sorted(off[client])[0]}); write it with `phi3lit export`")  # fmt: skip
        elif client == "vllm":
            need = max(ranks) if ranks else cfg["r"]
            if need > VLLM_DEFAULT_MAX_LORA_RANK:
                flag = next((v for v in VLLM_RANKS if v >= need), need)
                report[client] = (
                    True,
                    f"rank {need} > vLLM's default max_lora_rank 16: serve with --max-lora-rank {flag}",
                )
            else:
                report[client] = (True, "vllm serve BASE --enable-lora --lora-modules name=DIR")
        else:
            report[client] = (True, "convert_lora_to_gguf.py --base BASE_DIR DIR, then llama-cli --lora")
        if layout == "split" and report[client][0]:
            report[client] = (True, report[client][1] + "; serve the split base in base/ (stock Phi-3 has fused names)")
    return report


def preflight_merged(folder: Path, layout: str = "fused") -> dict[str, tuple[bool, str]]:
    """{client: (accepts, why)} for a merged model folder."""
    arch = "LlamaForCausalLM" if layout == "split" else "Phi3ForCausalLM"
    report = {
        "peft": (True, f"not needed: AutoModelForCausalLM.from_pretrained loads it ({arch})"),
        "vllm": (True, f"vllm serve DIR ({arch}, no LoRA)"),
    }
    if (Path(folder) / "tokenizer.model").is_file():
        report["llama.cpp"] = (True, "convert_hf_to_gguf.py DIR")
    else:
        report["llama.cpp"] = (False, "convert_hf_to_gguf.py needs the sentencepiece tokenizer.model for Phi-3 and "
                               "the base has none")  # fmt: skip
    return report


def format_report(report: dict[str, tuple[bool, str]], where) -> str:
    lines = [f"[phi3lit] export {where}: which clients take it"]
    lines += [f"  {c:<10} {'yes' if ok else 'no '}  {why}" for c, (ok, why) in report.items()]
    return "\n".join(lines)


def refuse_if(report: dict[str, tuple[bool, str]], target: str) -> None:
    if target != "any" and not report[target][0]:
        raise ConfigError(f"--target {target}: {target} cannot load this export: {report[target][1]}")


# ---------------------------------------------------------------------------- files around the tensors
def public_base_name(pretrained: str) -> str:
    """What `base_model_name_or_path` should say: the hub id or the user's path, never phi3lit's cache folder.

    `builtin:tiny-phi3` stays as it is (phi3lit's chat and predict resolve it); a relative local path becomes
    absolute so the adapter loads from any working directory.
    """
    from phi3lit.tiny import BUILTIN_PREFIX

    if pretrained.startswith(BUILTIN_PREFIX):
        return pretrained
    if Path(pretrained).expanduser().is_dir():
        return str(Path(pretrained).expanduser().resolve())
    return pretrained


def _resolve(pretrained: str) -> str:
    from phi3lit.tiny import resolve_pretrained

    return resolve_pretrained(pretrained)


def _set_base_name(folder: Path, name: str) -> None:
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


def _publish(stage: Path, out_dir: Path) -> None:
    fix_permissions(stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in stage.iterdir():
        target = out_dir / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)


def write_card(folder: Path, checkpoint: dict, module, report: dict, layout: str = "fused", raw: bool = False) -> None:
    """README.md: a model card with the base, data, LoRA settings, steps, metrics, clients and how to load it."""
    from dataclasses import asdict

    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    base = public_base_name(module.hparams.pretrained)
    spec = asdict(module.lora)
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    metrics = _metrics(checkpoint)
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [lora, phi3lit]",
        "---",
        "",
        f"# LoRA adapter for {base}",
        "",
        f"Trained with phi3lit; {'written by `phi3lit export`' if not raw else 'saved at the end of `fit`'}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{base}` |",
        f"| layout | {layout}{' (Llama-style names; base in `base/`)' if layout == 'split' else ''} |",
        f"| training data | `{data.get('train_file', 'unknown')}` (split `{data.get('split', '-')}`) |",
        f"| max length | {data.get('max_length', '-')} |",
        f"| steps | {checkpoint.get('global_step', 'unknown')} (epoch {checkpoint.get('epoch', '-')}) |",
        f"| LoRA targets | {', '.join(map(str, spec['targets']))} |",
        f"| r / alpha / dropout (training) | {spec['r']} / {spec['alpha']} / {spec['dropout']} |",
        f"| rsLoRA / DoRA / init | {spec['use_rslora']} / {spec['use_dora']} / {spec['init']} |",
        f"| rank / alpha patterns (training) | {spec['rank_pattern'] or '-'} / {spec['alpha_pattern'] or '-'} |",
        f"| modules_to_save | {spec['modules_to_save'] or '-'} |",
        f"| written as | r={cfg['r']}, lora_alpha={cfg['lora_alpha']}, rank_pattern={cfg.get('rank_pattern') or '-'}, "
        f"alpha_pattern={cfg.get('alpha_pattern') or '-'}, use_rslora={cfg.get('use_rslora')} |",
    ]
    lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    if not metrics:
        lines.append("| final metrics | none in the checkpoint |")
    lines += ["", "## Clients", ""]
    lines += [f"- **{c}**: {'yes' if ok else 'no'}: {why}" for c, (ok, why) in report.items()]
    if not raw:
        lines += [
            "",
            "The adapter is written so that every module has one rank and the scale `lora_alpha / r`: peft, vLLM "
            "and llama.cpp compute the same function (phi3lit checked every module when exporting).",
        ]
    loader = "the split base in `base/`" if layout == "split" else f"`{base}`"
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = AutoModelForCausalLM.from_pretrained(BASE)  # {loader}",
        "model = PeftModel.from_pretrained(base, ADAPTER_DIR)",
        "tokenizer = AutoTokenizer.from_pretrained(ADAPTER_DIR)  # the base's own tokenizer files",
        "```",
        "",
        "or `python -m phi3lit chat --adapter ADAPTER_DIR` (`builtin:` bases are resolved by phi3lit).",
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
