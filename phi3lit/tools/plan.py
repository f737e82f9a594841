"""`python -m phi3lit plan --config FILE.yaml`: will it fit? Counts and a memory estimate, before any GPU time.

Parameters are counted on the meta device (no weights are read; for the Phi-3 family's hub ids, phi3lit.family,
the architecture is known offline). Training memory is estimated as

    frozen weights            frozen params x bytes(model.torch_dtype); with model.quantization nf4, 4.127 bits per
                              decoder Linear weight and fp32 for the rest (prepare_model_for_kbit_training)
  + LoRA state                trainable params x (weight + grad + 2 AdamW moments)
  + activations               layers x micro_batch x max_length x bytes/token/layer
  + logits                    micro_batch x max_length x vocab x 8 bytes (fp32 logits and their grad; an upper
                              bound: phi3lit only computes logits at trained positions)

The activation term is not a formula: it is *measured* by running one decoder layer of the configured width,
dtype, LoRA targets and checkpointing setting on the CPU and adding up the bytes autograd saves for backward
(`torch.autograd.graph.saved_tensors_hooks`). Activation memory of a transformer is linear in tokens when
attention does not store the T x T matrix (flash / memory-efficient SDPA), so one layer at a short length
scales to the full model. With gradient checkpointing, each layer keeps only its input, plus one layer's full
activations while it is recomputed in backward. CUDA allocator overhead, fragmentation and kernel workspaces
come on top (typically 5-15%).
"""

from __future__ import annotations

import torch

from phi3lit.errors import ConfigError, missing_model
from phi3lit.family import FAMILY, check_phi3, member, phi3_config
from phi3lit.hub import resolve_pretrained
from phi3lit.model.lora import LoraSpec, apply_lora, effective_trainable, trainable_by_module

# The Phi-3 family's architectures (their config.json values, cited in phi3lit.family), so planning needs no
# download: the hub ids in phi3lit.family.FAMILY are built offline, anything else is read with AutoConfig.
KNOWN = {hub_id: m.config for hub_id, m in FAMILY.items()}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


def load_config(pretrained: str):
    """The model's config, offline for the Phi-3 family; anything that is not a Phi3ForCausalLM is refused."""
    from transformers import AutoConfig

    if member(pretrained) is not None:
        return phi3_config(pretrained)
    try:
        config = AutoConfig.from_pretrained(resolve_pretrained(pretrained))
    except OSError as e:
        raise missing_model(pretrained, e) from None
    except ValueError as e:  # an architecture this transformers does not know
        raise ConfigError(f"model.pretrained={pretrained!r}: not a Phi3ForCausalLM ({e})") from None
    check_phi3(config, pretrained)
    return config


def saved_bytes(model, input_ids: torch.Tensor) -> int:
    """Bytes of distinct tensors autograd saves in the backbone's forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    positions = torch.arange(input_ids.shape[1])[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().model(input_ids=input_ids, position_ids=positions, use_cache=False)
    return sum(storages.values())


def activation_bytes_per_token_layer(config, lora: LoraSpec, dtype: torch.dtype, checkpointing: bool) -> float:
    """Measured on one decoder layer of the real width, at a short sequence."""
    from transformers import AutoModelForCausalLM

    # One layer; a small vocabulary, since embedding and head weights hold no activations (and would cost seconds
    # of random init: 32,064 x 3,072 for Phi-3 mini). The special-token ids go with the vocabulary they index.
    small = {
        "num_hidden_layers": 1,
        "vocab_size": 1000,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    one = config.__class__(**{**config.to_dict(), **small})
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_config(one, attn_implementation="sdpa", dtype=dtype), lora).train()
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    probe = 64
    ids = torch.randint(3, one.vocab_size, (1, probe))
    return saved_bytes(model, ids) / probe


def estimate(
    pretrained: str,
    lora: LoraSpec,
    torch_dtype: str,
    precision: str,
    micro_batch: int,
    max_length: int,
    gradient_checkpointing: bool,
    quantization: str | None = None,
    shards: int = 1,
) -> dict:
    """Counts and a per-device memory estimate. `shards` > 1: FSDP2 over that many processes
    (configs/strategy/fsdp2.yaml): the decoder layers' weights, the LoRA weights, their gradients and AdamW's state
    are split `shards` ways; the rest of the base (embeddings, final norm, LM head) is held whole, as phi3lit
    shards it, and one decoder layer is gathered whole at a time (its working copy)."""
    from transformers import AutoModelForCausalLM

    config = load_config(pretrained)
    with torch.device("meta"):
        model = apply_lora(AutoModelForCausalLM.from_config(config), lora)
    trainable = effective_trainable(model)
    total = sum(p.numel() for p in model.parameters())
    adapter_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)  # zero blocks included on disk
    half_true = precision in ("bf16-true", "16-true")
    lora_bytes = 2 if half_true else 4  # peft keeps adapters fp32 over a half-precision base unless -true
    compute = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
    tokens = micro_batch * max_length
    act = activation_bytes_per_token_layer(config, lora, compute, False)
    if gradient_checkpointing:
        kept = activation_bytes_per_token_layer(config, lora, compute, True)
        activations = tokens * (config.num_hidden_layers * kept + act)
    else:
        activations = tokens * config.num_hidden_layers * act
    frozen = (total - adapter_numel) * BYTES[torch_dtype]
    if quantization == "nf4":
        # bitsandbytes NF4 with double quantization: 4 bits per weight of the decoder's Linear layers plus an 8-bit
        # absmax per 64 weights and an fp32 one per 256 of those (4.127 bits); lm_head stays unquantized, and
        # prepare_model_for_kbit_training casts every other frozen parameter (embeddings, norms, lm_head) to fp32.
        linear = sum(
            m.weight.numel()
            for name, m in model.get_base_model().model.layers.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name
        )
        frozen = linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + (total - adapter_numel - linear) * 4
    if shards > 1:  # FSDP2: the layers' share of the frozen bytes is split, plus one gathered layer
        layer_frozen = sum(
            p.numel() for n, p in model.get_base_model().model.layers.named_parameters() if "lora_" not in n
        )
        layer_share = frozen * layer_frozen / (total - adapter_numel)
        frozen = frozen - layer_share + layer_share / shards + layer_share / config.num_hidden_layers
    parts = {
        "frozen weights": frozen,
        "LoRA weights + grads + AdamW": adapter_numel * lora_bytes * 4 / shards,
        "activations": activations,
        "logits (upper bound)": tokens * config.vocab_size * 8,
    }
    return {
        "total_params": total,
        "trainable_params": trainable,
        "trainable_by_module": trainable_by_module(model),
        "adapter_bytes": adapter_numel * 4,
        "activation_bytes_per_token_layer": act,
        "memory": parts,
        "memory_total": sum(parts.values()),
        "shards": shards,
    }


def report(result: dict, title: str) -> str:
    gib = 2**30
    lines = [f"plan for {title}", ""]
    lines.append(f"parameters: {result['total_params']:,} total, {result['trainable_params']:,} trainable")
    for k, v in sorted(result["trainable_by_module"].items()):
        lines.append(f"  {k:<14} {v:>14,}")
    lines.append(f"adapter file (fp32): {result['adapter_bytes'] / 2**20:,.1f} MiB")
    # A Lightning checkpoint holds the LoRA tensors plus AdamW's two moments (and small loop state).
    lines.append(f"checkpoint (LoRA + AdamW state, fp32): {3 * result['adapter_bytes'] / 2**20:,.1f} MiB")
    shards = result.get("shards", 1)
    where = "one device" if shards == 1 else f"per device, FSDP2 over {shards} processes"
    lines.append(f"training memory estimate ({where}):")
    for k, v in result["memory"].items():
        lines.append(f"  {k:<30} {v / gib:8.2f} GiB")
    lines.append(f"  {'total':<30} {result['memory_total'] / gib:8.2f} GiB  (+5-15% allocator overhead)")
    return "\n".join(lines)


def fsdp2_shards(config) -> int:
    """How many ways FSDP2 splits the model under the config's strategy (1 without ModelParallelStrategy)."""
    strategy = config.trainer.strategy
    if "ModelParallelStrategy" not in str(getattr(strategy, "class_path", strategy)):
        return 1
    size = (strategy.get("init_args") or {}).get("data_parallel_size", 1)
    return size if isinstance(size, int) and size > 1 else 1


def plan_from_cli(cli) -> str:
    hp, dhp = cli.model.hparams, cli.datamodule.hparams
    result = estimate(
        hp.pretrained,
        cli.model.lora,
        hp.torch_dtype,
        str(cli.trainer.precision),
        dhp.batch_size,
        dhp.max_length,
        hp.gradient_checkpointing,
        hp.quantization,
        fsdp2_shards(cli.config),
    )
    quantized = ", 4-bit NF4 base" if hp.quantization else ""
    title = (
        f"{hp.pretrained} ({cli.trainer.precision}{quantized}, micro-batch {dhp.batch_size} x {dhp.max_length} tokens)"
    )
    return report(result, title)
