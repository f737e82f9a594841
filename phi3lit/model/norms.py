"""‖ΔW‖_F of a live model's LoRA updates, per kind and layer, cheap enough to log during training.

ΔW = scale · B · A is never formed: ‖BA‖_F² = sum((BᵀB) ⊙ (AAᵀ)), two r x r products per module and one
device-to-host copy for all modules. For slice targets (q, v of a fused qkv_proj) each slice is its own update,
found from the slice mask of its B. The analysis of saved adapters (`phi3lit.tools.analysis`) uses the same
slicing (`mask_slices`).
"""

from __future__ import annotations

import math
import re

import torch

LAYER = re.compile(r"\.layers\.(\d+)\.")  # a parameter name's decoder layer index


def lora_delta_norms(model: torch.nn.Module, adapter: str = "default", per_layer: bool = True) -> dict[str, float]:
    """‖scale · B · A‖_F of every LoRA update of a (peft) model, for logging during training.

    Keys: `lora_norm/<kind>` (the root of the sum of squares over layers, i.e. ‖ΔW‖_F of all that kind's updates
    together) and, with `per_layer`, `lora_norm/<kind>/layer_<i>`. `kind` is the module (qkv_proj, o_proj, ...)
    or, for slice targets, the slice (q, v, gate, ...). Computed without forming ΔW: ‖BA‖_F² =
    sum((BᵀB) ⊙ (AAᵀ)), two r x r products; one device-to-host copy for all modules. DoRA's magnitude vector is
    not included; under FSDP or DeepSpeed ZeRO-3 the parameters are shards and the numbers are not meaningful.
    """
    config = getattr(model, "config", None)
    names, squares = [], []
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if not isinstance(scaling, dict) or adapter not in scaling:
            continue
        if adapter in getattr(module, "lora_A", {}):
            a, b_mod = module.lora_A[adapter].weight, module.lora_B[adapter]
            b = b_mod.weight
        elif adapter in getattr(module, "lora_embedding_A", {}):
            a, b, b_mod = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter], None
        else:
            continue
        kind = name.rsplit(".", 1)[-1]
        layer = LAYER.search(name + ".")
        mask = getattr(b_mod, "slice_mask", None)
        parts = mask_slices(mask, kind, config) if mask is not None else [(kind, slice(None), slice(None))]
        with torch.no_grad():
            for part, rows, cols in parts:
                bb, aa = b[rows, cols].float(), a[cols].float()
                squares.append(scaling[adapter] ** 2 * ((bb.T @ bb) * (aa @ aa.T)).sum())
                names.append((part, int(layer.group(1)) if layer else None))
    if not squares:
        return {}
    values = torch.stack(squares).clamp_min(0).tolist()
    out: dict[str, float] = {}
    for (kind, layer), sq in zip(names, values, strict=True):
        out[f"lora_norm/{kind}"] = out.get(f"lora_norm/{kind}", 0.0) + sq
        if per_layer and layer is not None:
            out[f"lora_norm/{kind}/layer_{layer}"] = out.get(f"lora_norm/{kind}/layer_{layer}", 0.0) + sq
    return {k: math.sqrt(v) for k, v in out.items()}


def mask_slices(mask: torch.Tensor, kind: str, config) -> list[tuple[str, slice, slice]]:
    """The (slice name, rows, columns) blocks of a sliced LoRA B, read from its slice mask (phi3lit.model.lora)."""
    from phi3lit.model.lora import slice_rows

    try:
        names = {rows: s for s, rows in slice_rows(config, kind).items()}
    except (KeyError, AttributeError, TypeError):
        names = {}
    rows_on = mask.any(1).tolist()
    parts, lo = [], None
    for i, on in enumerate([*rows_on, False]):
        if on and lo is None:
            lo = i
        elif not on and lo is not None:
            cols = mask[lo].nonzero().flatten()
            c0, c1 = int(cols.min()), int(cols.max()) + 1
            parts.append((names.get((lo, i), f"{kind}[{lo}:{i}]"), slice(lo, i), slice(c0, c1)))
            lo = None
    return parts
