"""LoRA for Phi-3: the target vocabulary, slice-aware adapters on fused projections, loralib helpers.

LoRA (Hu et al. 2021) freezes a pretrained weight W (out x in) and learns a low-rank update:

    h = W x + (alpha / r) * B A dropout(x),     A: r x in (random init), B: out x r (zero init)

so training starts exactly at the pretrained model and adds r * (in + out) parameters per adapted layer.
With `use_rslora` the scale is alpha / sqrt(r) (Kalajdzievski 2023), which keeps updates stable as r grows.

Phi-3 fuses projections: `qkv_proj` holds the q, k and v rows (3072 + 3072 + 3072 for Phi-3-mini) and
`gate_up_proj` the gate and up rows (8192 + 8192). Adapting "q and v only" therefore means adapting *row
slices* of one Linear. loralib's `MergedLinear(enable_lora=[True, False, True])` does this with one A (r x in)
and one B (slice x r) per enabled slice. phi3lit expresses exactly that inside a stock peft LoRA layer: the
layer gets rank r * k for k enabled slices, A stacks the k per-slice A's, and B is block-structured — the rows
of slice j only see the columns of A_j, and rows of disabled slices are zero. A gradient mask keeps the zero
blocks at exactly zero (Adam's update of a parameter whose gradient is always 0 is 0), so disabled slices stay
bit-identical to the base, while the saved adapter is an ordinary peft adapter (`rank_pattern` /
`alpha_pattern` carry the per-module rank and the scale alpha/r of one slice) that stock peft loads unchanged.
The trainable count reported is the effective one: it excludes the zero blocks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from phi3lit.errors import ConfigError

FUSED = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}
LOGICAL = {
    "q": "qkv_proj", "k": "qkv_proj", "v": "qkv_proj", "o": "o_proj",
    "gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj",
    "embed": "embed_tokens", "lm_head": "lm_head",
}  # fmt: skip
PRESETS = {
    "all-linear": ["q", "k", "v", "o", "gate", "up", "down"],
    "attn": ["q", "k", "v", "o"],
    "mlp": ["gate", "up", "down"],
}
RAW = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"}
INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


@dataclass
class LoraSpec:
    """LoRA hyper-parameters (the model card's sample recipe by default).

    Args:
        r: rank of the update B @ A (per slice for sliced targets such as [q, v]).
        alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).
        dropout: dropout on the LoRA branch input; 0 skips the copy.
        targets: logical names q k v o gate up down embed lm_head, presets all-linear / attn / mlp, or raw module
            names (qkv_proj, o_proj, gate_up_proj, down_proj); on the command line a list is written '[q, v]'.
        modules_to_save: modules trained in full and saved with the adapter: embed, lm_head.
        use_rslora: scale by alpha / sqrt(r) (rank-stabilised LoRA).
        force_rank: allow r above min(in, out) of a target (adds parameters, no capacity).
        use_dora: weight-decomposed LoRA (DoRA): a trained magnitude per output row.
        init: peft's init_lora_weights: default (A Kaiming, B zero), gaussian, pissa, olora.
        rank_pattern: per-module rank, e.g. {down_proj: 8}.
        alpha_pattern: per-module alpha.
        bias: which biases train (loralib's modes): none, all, lora_only.
    """

    r: int = 16  # rank of the update B @ A (per slice for sliced targets)
    alpha: float = 32.0  # update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.05  # dropout on the LoRA branch input; 0 skips the copy
    # Logical names q k v o gate up down embed lm_head, presets all-linear / attn / mlp, or raw module names.
    targets: list[str] | str = field(default_factory=lambda: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    modules_to_save: list[str] = field(default_factory=list)  # fully trained modules: embed, lm_head
    use_rslora: bool = False  # scale alpha / sqrt(r)
    force_rank: bool = False  # allow r above min(in, out) of a target (no added capacity, only parameters)
    use_dora: bool = False  # weight-decomposed LoRA (DoRA): a trained magnitude per output row
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"  # peft's init_lora_weights
    rank_pattern: dict[str, int] = field(default_factory=dict)  # per-module rank, e.g. {"down_proj": 8}
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # per-module alpha
    bias: Literal["none", "all", "lora_only"] = "none"  # which biases train (loralib's modes)

    def __post_init__(self):
        if isinstance(self.targets, str):  # `--model.lora.targets all-linear`
            self.targets = [self.targets]
        if self.r <= 0:
            raise ConfigError(f"model.lora.r must be positive, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets and not self.modules_to_save:
            raise ConfigError("model.lora.targets is empty: nothing would be trained")
        plan = resolve_targets(self.targets)  # raises on unknown names
        saved = {_module_name(m, "model.lora.modules_to_save") for m in self.modules_to_save}
        if saved & set(plan):
            raise ConfigError(f"model.lora: {sorted(saved & set(plan))} is both a LoRA target and in modules_to_save")
        sliced = [m for m, s in plan.items() if s is not None]
        if sliced and (self.use_dora or self.init in ("pissa", "olora")):
            raise ConfigError(
                f"model.lora: slice targets ({', '.join(self.targets)}) adapt part of {', '.join(sliced)}; "
                "use_dora and pissa/olora init act on whole weight rows and would change the disabled slices. "
                "Target whole modules (qkv_proj, gate_up_proj) to use them."
            )
        clash = (set(self.rank_pattern) | set(self.alpha_pattern)) & set(sliced)
        if clash:
            raise ConfigError(f"model.lora: rank/alpha patterns for sliced modules {sorted(clash)} are not supported")
        for key, value in self.rank_pattern.items():
            if value <= 0:
                raise ConfigError(f"model.lora.rank_pattern[{key!r}] must be positive, got {value}")


def _module_name(name: str, where: str) -> str:
    if name in RAW:
        return name
    if name in LOGICAL and LOGICAL[name] not in FUSED:
        return LOGICAL[name]
    raise ConfigError(f"{where}: {name!r} is not a whole module; use one of {sorted(RAW | {'embed', 'o', 'down'})}")


def resolve_targets(targets: list[str]) -> dict[str, tuple[str, ...] | None]:
    """Target names -> {module name: enabled slices, or None for the whole module}.

    `["q", "v", "o"]` -> `{"qkv_proj": ("q", "v"), "o_proj": None}`; `["attn"]` -> whole qkv_proj and o_proj.
    """
    slices: dict[str, set[str]] = {}
    for name in targets:
        expanded = PRESETS.get(name, [name])
        for t in expanded:
            if t in RAW:
                slices.setdefault(t, set()).update(FUSED.get(t, ()))
            elif t in LOGICAL:
                module = LOGICAL[t]
                slices.setdefault(module, set()).update([t] if module in FUSED else [])
            else:
                known = sorted(PRESETS) + sorted(LOGICAL) + sorted(RAW)
                hint = ""
                if "," in t:  # `--model.lora.targets q,v` arrives as one string
                    hint = f" (for several targets write a list: --model.lora.targets '[{t.replace(',', ', ')}]')"
                raise ConfigError(f"model.lora.targets: unknown target {t!r}{hint}; known: {', '.join(known)}")
    plan = {}
    for module, enabled in slices.items():
        order = FUSED.get(module, ())
        full = set(order) == enabled
        plan[module] = None if (not order or full) else tuple(s for s in order if s in enabled)
    return plan


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each Phi-3 projection; for fused ones, of one slice (the LoRA per slice)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    h, i = config.hidden_size, config.intermediate_size
    return {
        "qkv_proj": (h, config.num_key_value_heads * head_dim),  # the smallest slice (k and v under GQA)
        "o_proj": (config.num_attention_heads * head_dim, h), "gate_up_proj": (h, i), "down_proj": (i, h),
        "embed_tokens": (config.vocab_size, h), "lm_head": (h, config.vocab_size),
    }  # fmt: skip


def check_rank(spec: LoraSpec, config) -> None:
    """A rank above min(in, out) adds parameters but no capacity: B A already has full rank before that.

    r=100000 on a 256-wide model trained 716,800,000 parameters and wrote 8 GB checkpoints; reject it unless
    `force_rank` says it is meant.
    """
    if spec.force_rank:
        return
    shapes = module_shapes(config)
    for module in resolve_targets(spec.targets):
        r = spec.rank_pattern.get(module, spec.r)
        limit = min(shapes[module])
        if r > limit:
            key = f"model.lora.rank_pattern[{module!r}]" if module in spec.rank_pattern else "model.lora.r"
            raise ConfigError(
                f"{key}={r} is above min(in, out)={limit} of {module} {shapes[module]}: a larger rank adds "
                f"parameters but no capacity. Use r <= {limit}, or set model.lora.force_rank=true"
            )


def slice_rows(config, module: str) -> dict[str, tuple[int, int]]:
    """Output-row range of each slice of a fused Phi-3 projection."""
    if module == "qkv_proj":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q = config.num_attention_heads * head_dim
        kv = config.num_key_value_heads * head_dim
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    if module == "gate_up_proj":
        i = config.intermediate_size
        return {"gate": (0, i), "up": (i, 2 * i)}
    raise KeyError(module)


def peft_config(spec: LoraSpec, task_type: str | None = "CAUSAL_LM"):
    """The peft LoraConfig for a spec: sliced modules get rank r * k and the alpha that keeps alpha / r."""
    from peft import LoraConfig

    plan = resolve_targets(spec.targets)
    rank_pattern, alpha_pattern = dict(spec.rank_pattern), dict(spec.alpha_pattern)
    for module, enabled in plan.items():
        if enabled is not None:
            k = len(enabled)
            rank_pattern[module] = spec.r * k
            # peft scales by alpha'/r' (or alpha'/sqrt(r')); choose alpha' so each slice sees alpha/r.
            alpha_pattern[module] = spec.alpha * (math.sqrt(k) if spec.use_rslora else k)
    saved = [_module_name(m, "model.lora.modules_to_save") for m in spec.modules_to_save]
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=sorted(plan),
        modules_to_save=saved or None,
        use_rslora=spec.use_rslora,
        use_dora=spec.use_dora,
        init_lora_weights=INITS[spec.init],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias=spec.bias,
        task_type=task_type,
    )


def apply_lora(base: nn.Module, spec: LoraSpec):
    """Wrap a Phi-3 causal LM in peft LoRA per `spec`; only adapters (and modules_to_save) train."""
    from peft import get_peft_model

    model = get_peft_model(base, peft_config(spec))
    install_slice_masks(model, spec, base.config)
    return model


def install_slice_masks(model: nn.Module, spec: LoraSpec, config) -> None:
    """Zero the off-slice blocks of B for sliced targets and keep them zero through training."""
    plan = resolve_targets(spec.targets)
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        enabled = plan.get(short)
        if enabled is None or not hasattr(module, "lora_B"):
            continue
        for lora_b in module.lora_B.values():
            weight = lora_b.weight
            mask = torch.zeros_like(weight, dtype=torch.bool, device="cpu")
            rows = slice_rows(config, short)
            for j, s in enumerate(enabled):
                lo, hi = rows[s]
                mask[lo:hi, j * spec.r : (j + 1) * spec.r] = True
            # A buffer, so it follows the module across devices; not persistent: checkpoints stay peft-shaped.
            on_meta = weight.device.type == "meta"  # planning on meta: the mask must stay countable
            lora_b.register_buffer("slice_mask", mask if on_meta else mask.to(weight.device), persistent=False)
            if not on_meta:
                with torch.no_grad():
                    weight.mul_(lora_b.slice_mask)
            weight.register_hook(lambda g, m=lora_b: g * m.slice_mask.to(g.dtype))


def logical_numel(p: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for: a bitsandbytes 4-bit weight stores two per byte, packed
    into a (n/2, 1) uint8 tensor, and keeps its real shape in `quant_state`."""
    quant_state = getattr(p, "quant_state", None)
    return math.prod(quant_state.shape) if quant_state is not None else p.numel()


def effective_trainable(model: nn.Module) -> int:
    """Trainable parameters, not counting the always-zero off-slice blocks of sliced targets."""
    total = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                mask = getattr(module, "slice_mask", None)
                total += int(mask.sum()) if mask is not None else p.numel()
    return total


def trainable_by_module(model: nn.Module) -> dict[str, int]:
    """Effective trainable parameters per module type (qkv_proj, o_proj, ..., lm_head)."""
    counts: dict[str, int] = {}
    pattern = re.compile(r"\.(" + "|".join(sorted(RAW)) + r")\.")
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                m = pattern.search(name + ".")
                key = m.group(1) if m else name
                mask = getattr(module, "slice_mask", None)
                counts[key] = counts.get(key, 0) + (int(mask.sum()) if mask is not None else p.numel())
    return counts


def trainable_summary(model: nn.Module, spec: LoraSpec) -> str:
    """peft's `print_trainable_parameters` line with effective counts, and the split per module type."""
    trainable, total = effective_trainable(model), sum(logical_numel(p) for p in model.parameters())
    by_module = ", ".join(f"{k} {v:,}" for k, v in sorted(trainable_by_module(model).items()))
    return (
        f"[phi3lit] trainable params: {trainable:,} || all params: {total:,} || trainable: "
        f"{100 * trainable / total:.4f}% (LoRA r={spec.r} on {', '.join(spec.targets)}: {by_module})"
    )


# ---------------------------------------------------------------------------- loralib's workflow
def _lora_module_prefixes(model: nn.Module) -> set[str]:
    """Names of the modules that carry LoRA (whose own base-layer bias is 'lora_only')."""
    return {name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A" in name}


def _bias_selected(name: str, bias: str, lora_prefixes: set[str]) -> bool:
    if not name.endswith("bias") or bias == "none":
        return False
    if bias == "all":
        return True
    owner = name.rsplit(".", 1)[0]  # ".../qkv_proj.base_layer" for peft, ".../layer" for loralib
    return any(owner == p or owner == p + ".base_layer" for p in lora_prefixes)


def mark_only_lora_as_trainable(model: nn.Module, bias: Literal["none", "all", "lora_only"] = "none") -> None:
    """loralib's function: freeze everything but LoRA weights, and the biases that `bias` names.

    `none`: no bias trains; `all`: every bias trains; `lora_only`: only biases of LoRA-adapted layers.
    """
    if bias not in ("none", "all", "lora_only"):
        raise ConfigError(f"bias must be none, all or lora_only, got {bias!r}")
    prefixes = _lora_module_prefixes(model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or _bias_selected(name, bias, prefixes)


def lora_state_dict(model: nn.Module, bias: Literal["none", "all", "lora_only"] = "none") -> dict[str, torch.Tensor]:
    """loralib's function, extended to peft: everything an adapter trains, for a small checkpoint.

    The LoRA tensors (`lora_A`, `lora_B`, DoRA's `lora_magnitude_vector`, ...), peft's trained copies of
    `modules_to_save`, and the biases `bias` names. phi3lit's checkpoints hold exactly this
    (`Phi3LoRA.on_save_checkpoint`). Load it over a base checkpoint with `model.load_state_dict(sd, strict=False)`.
    """
    prefixes = _lora_module_prefixes(model)
    return {
        k: v
        for k, v in model.state_dict().items()
        if "lora_" in k or ".modules_to_save." in k or _bias_selected(k, bias, prefixes)
    }


# ---------------------------------------------------------------------------- tied embeddings (Phi-4-mini)
def tied_embeddings(model: nn.Module) -> bool:
    """Whether the model's input embedding and output projection share one weight tensor."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    if inp is None or out is None:
        return False
    inp, out = getattr(inp, "base_layer", inp), getattr(out, "base_layer", out)  # under a peft LoRA layer
    inp = getattr(inp, "original_module", inp)  # under modules_to_save
    out = getattr(out, "original_module", out)
    return inp.weight is out.weight


def untie_for_merge(model: nn.Module) -> bool:
    """Give the output projection its own copy of a tied embedding matrix before LoRA is merged; True if it did.

    With tied weights (Phi-4-mini) a LoRA on `lm_head` or `embed` changes only one of the two uses of the shared
    matrix while training (peft adds B A to that layer's output). `merge_and_unload` would then fold B A into the
    shared tensor and so into both uses: the merged model's logits differ from the trained model's. Copying the
    matrix first keeps each use's own weights, and `tie_word_embeddings` becomes false, so the merged model saves
    and reloads as it was trained (at the cost of a second vocab x hidden matrix on disk). `modules_to_save` needs
    nothing: peft trains a copy there already.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not tied_embeddings(base):
        return False
    adapted = [m for m in (base.get_input_embeddings(), base.get_output_embeddings()) if hasattr(m, "base_layer")]
    if not adapted:  # no LoRA on either use of the matrix: merging leaves it alone, the tie stays
        return False
    out = base.get_output_embeddings()
    if hasattr(out, "original_module"):  # modules_to_save: peft trains, merges and unties a copy itself
        return False
    out = getattr(out, "base_layer", out)
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
    for config in (base.config, getattr(base.config, "text_config", None)):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    return True


# ---------------------------------------------------------------------------- FSDP2 (ModelParallelStrategy)
def shard_fsdp2(model: nn.Module, mesh, mp_policy=None) -> None:
    """Shard a peft Phi-3 with FSDP2 (`fully_shard`) over `mesh`: each decoder layer, then the trunk as the root.

    phi3lit calls the trunk (`Phi3Model`), never the causal LM's forward, so the trunk is the root unit: its
    forward gathers the embedding and the final norm, and it stays gathered until backward. The frozen LM head,
    whose weight the fused loss reads directly (phi3lit.model.loss), is not sharded: every rank holds it whole
    (vocab x hidden; with tied embeddings it is the root's embedding). A trained head is refused at config time.
    """
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh} | ({"mp_policy": mp_policy} if mp_policy is not None else {})
    causal_lm = model.get_base_model()
    for layer in causal_lm.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(causal_lm.model, **kwargs)
