"""What each client reads from an adapter, and the one form that peft, vLLM and llama.cpp read the same way.

One contract: the written adapter means the same thing in stock peft, vLLM and llama.cpp. They disagree on
scales. peft scales each module by its own alpha / r (rank_pattern, alpha_pattern) or alpha / sqrt(r)
(rsLoRA); vLLM 0.34 does the same per module (`PEFTHelper.get_rank_and_scaling`, read in its source), while
earlier vLLM releases used one global alpha / r for every module; llama.cpp's converter keeps only the global
`lora_alpha` and its runtime uses alpha / (that tensor's rank). A phi3lit slice target ([q, v]) is a rank r*k
module with alpha*k, so a raw adapter is exact in peft and vLLM 0.34 only. The export therefore rewrites it into
the one form all these rules agree on: every module padded with zero rows of A / columns of B to one rank R
(exact: zero rank components add nothing), each module's true scale folded into its B so that alpha' / R is the
scale everywhere, and no rank_pattern, alpha_pattern or rsLoRA left. vLLM's GPU memory does not grow with the
padding (every LoRA slot is --max-lora-rank wide, and the largest rank is the same). Every module is then
checked against the training module under each rule, and the export fails if one is not exact.

`bias`: vLLM rejects any adapter whose config says `"bias" != "none"`. peft's `bias` only says which base biases
train and are saved; Phi-3 has none (every Linear is bias=False), so an adapter holding no bias tensor is
written with `"none"`, which is exact; one that holds bias tensors keeps its setting and vLLM is refused.

`preflight_adapter` / `preflight_merged` say, per client, whether it takes a written folder as it is, and why not."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from phi3lit.errors import ConfigError
from phi3lit.export.adapter_files import copy_tokenizer_files, public_base_name, set_base_name, split_adapter

CLIENTS = ("peft", "vllm", "llama.cpp")
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}  # relative, per dtype written


class ExportMismatch(RuntimeError):
    """A written adapter would not compute the trained function in some client: a bug in the export, not input."""


def write_adapter(peft_model, folder: Path, pretrained: str, dtype, layout: str = "fused", spec=None) -> None:
    """Write the adapter of `peft_model` to `folder` in the form every client reads alike, and verify it."""
    from safetensors.torch import load_file, save_file

    peft_model.save_pretrained(folder)  # fp32 tensors: folding happens before any rounding to `dtype`
    set_base_name(folder, public_base_name(pretrained))
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
    if cfg.get("bias", "none") != "none" and not bias_tensors(tensors):
        cfg["bias"] = "none"  # exact: no base bias trained or saved (Phi-3 has none); vLLM rejects any other value
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    bad = verify(load_file(folder / "adapter_model.safetensors"), cfg, reference, dtype)
    wrong = bad  # every rule (peft, vLLM old and new, llama.cpp) must reproduce every module
    if wrong and cfg.get("init_lora_weights") not in ("pissa", "olora"):
        raise ExportMismatch(f"the written adapter is not exact for {len(wrong)} modules: {_first(wrong)}")
    copy_tokenizer_files(pretrained, folder)


def bias_tensors(tensors: dict) -> list[str]:
    """The keys of a peft state dict that hold base-layer biases (saved when `bias` is all or lora_only)."""
    return [k for k in tensors if k.rsplit(".", 1)[-1] == "bias"]


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
    alpha / (rank of that tensor). vLLM 0.34: `PEFTHelper.get_rank_and_scaling` matches rank_pattern and
    alpha_pattern per module with peft's own rule (a key matches a "."-bounded suffix of the module name, first
    match wins) and uses alpha / r or alpha / sqrt(r): peft's scale. "vllm-global": earlier vLLM releases, one
    alpha / r from the global r for every module, patterns ignored (the export is exact there too).
    """
    root = math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"]
    peft = peft_scale(cfg, prefix)
    return {"peft": peft, "llama.cpp": cfg["lora_alpha"] / rank, "vllm": peft, "vllm-global": cfg["lora_alpha"] / root}


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
            bad[prefix] = [*CLIENTS, "vllm-global"]  # a module lost or invented: wrong everywhere
            continue
        scale, a_ref, b_ref = reference[prefix]
        a, b = (t.float() for t in pairs[prefix])
        r = a_ref.shape[0]
        shape_ok = a.shape[0] >= r and a.shape[1:] == a_ref.shape[1:] and b.shape[0] == b_ref.shape[0]
        if not shape_ok or a[r:].any() or b[:, r:].any() or not _close(a[:r], a_ref, tol):
            bad[prefix] = [*CLIENTS, "vllm-global"]
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


def preflight_adapter(folder: Path, layout: str = "fused") -> dict[str, tuple[bool, str]]:
    """{client: (accepts, why)} for an adapter folder, from its config and tensors (rules as in client_scales)."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    tensors = load_file(Path(folder) / "adapter_model.safetensors")
    pairs = lora_pairs(tensors)
    ranks = {a.shape[0] for a, _ in pairs.values()}
    # Clients that use other scale rules than peft's: which modules would they scale differently?
    off = {c: [] for c in ("vllm", "vllm-global", "llama.cpp")}
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
    vllm_blockers, vllm_fix = list(blockers), "export with --merge"
    if cfg.get("bias", "none") != "none":
        held = bias_tensors(tensors)
        vllm_blockers.append(f"bias {cfg['bias']!r} ({len(held)} bias tensors)" if held else f"bias {cfg['bias']!r}")
        if not held and not blockers:  # nothing to drop: the export writes "none", which is exact
            vllm_fix = "the adapter holds no bias tensor, so `phi3lit export` writes bias 'none' (exact)"
    report = {}
    if layout == "split":
        report["peft"] = (True, "on the split base in base/ (base_model_name_or_path ./base: relative to the "
                          "adapter folder); on a stock Phi-3 base peft would silently skip q/k/v/gate/up")  # fmt: skip
    elif cfg.get("init_lora_weights") in ("pissa", "olora"):
        report["peft"] = (True, f"peft redoes the {cfg['init_lora_weights']} init on the base while loading (slow)")
    else:
        report["peft"] = (True, "PeftModel.from_pretrained on the stock base")
    for client in ("vllm", "llama.cpp"):
        refused = vllm_blockers if client == "vllm" else blockers
        if refused:
            fix = vllm_fix if client == "vllm" else "export with --merge"
            report[client] = (False, f"{client} rejects {', '.join(refused)}; {fix}")
        elif off[client]:
            report[client] = (False, f"{client} would scale {len(off[client])} modules wrongly (e.g. "
                              f"{sorted(off[client])[0]}); write it with `phi3lit export`")  # fmt: skip
        elif client == "vllm":
            # vLLM checks max(r, rank_pattern values) against --max-lora-rank, whatever the tensors hold.
            need = max([*ranks, cfg["r"], *(cfg.get("rank_pattern") or {}).values()])
            if need > VLLM_DEFAULT_MAX_LORA_RANK:
                flag = next((v for v in VLLM_RANKS if v >= need), need)
                report[client] = (
                    True,
                    f"rank {need} > vLLM's default max_lora_rank 16: serve with --max-lora-rank {flag}",
                )
            else:
                report[client] = (True, "vllm serve BASE --enable-lora --lora-modules name=DIR")
            if off["vllm-global"]:
                report[client] = (True, report[client][1] + "; vLLM 0.34 applies its rank/alpha patterns per module "
                                  "(older vLLM does not: use `phi3lit export` for those)")  # fmt: skip
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
