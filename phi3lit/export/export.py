"""Export a trained run: a peft adapter that every client reads the same way (fused or split layout), or a
merged full model.

`python -m phi3lit export --ckpt runs/x/checkpoints/last.ckpt --out DIR [--merge] [--layout fused|split]
[--dtype fp32|bf16|fp16] [--target any|peft|vllm|llama.cpp]`

The contract every written adapter keeps, and which client takes what, are in `clients.py`; the files around
the tensors and the split layout in `adapter_files.py`.

* fused: stock `Phi3ForCausalLM` names (`qkv_proj`, `gate_up_proj`).
* split: the same adapter for the Llama layout (`q_proj`, ... `up_proj`), written together with the matching
  split base in `DIR/base` (a `LlamaForCausalLM` with the same weights) that `base_model_name_or_path` names
  as `./base`, relative to the adapter folder, so the folder can be moved: on a stock Phi-3 base, peft would
  silently skip the q/k/v/gate/up tensors.
* merge: W + scale * B A folded into the weights, saved with `save_pretrained` (safetensors): a model folder
  that `AutoModelForCausalLM.from_pretrained`, vLLM and llama.cpp's `convert_hf_to_gguf.py` load, with its
  own model card.

Every export carries the base's own tokenizer files byte for byte (llama.cpp's converter needs Phi-3's
sentencepiece `tokenizer.model`, which `save_pretrained` in transformers 5 no longer writes), a model card,
and files readable by other users. A preflight report says which clients take the result, and why not.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch

from phi3lit.checkpoint import read_checkpoint
from phi3lit.errors import ConfigError
from phi3lit.export.adapter_files import (
    SPLIT_BASE,
    TOKENIZER_FILES,
    copy_tokenizer_files,
    fix_permissions,
    public_base_name,
    publish,
    set_base_name,
    split_base,
    write_card,
    write_merged_card,
)
from phi3lit.export.clients import CLIENTS, format_report, preflight_adapter, preflight_merged, refuse_if, write_adapter
from phi3lit.model.lora import untie_for_merge

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Target = Literal["any", "peft", "vllm", "llama.cpp"]


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
                # Relative, so the folder can be moved: phi3lit resolves "./" names against the adapter folder;
                # peft and transformers pass the name to from_pretrained as is (relative to the working directory).
                set_base_name(stage, SPLIT_BASE)
            write_card(stage, checkpoint, module, report, layout=layout)
        else:
            write_merged_card(stage, checkpoint, module, report, layout=layout, dtype=dtype)
        publish(stage, out_dir)
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
    set_base_name(out_dir, public_base_name(pretrained))
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
    from phi3lit.model.module import Phi3LoRA

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the")
        # A QLoRA run merges onto the unquantized base, as users expect: the 4-bit base is only a training device.
        return Phi3LoRA.load_from_checkpoint(path, map_location="cpu", quantization=None)
