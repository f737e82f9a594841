"""`python -m phi3lit plan --config FILE.yaml`: will it fit? Counts and a memory estimate, before any GPU time.

Parameters are counted on the meta device (no weights are read; for the Phi-3-mini hub id the architecture is
known offline). Training memory is estimated as

    frozen weights            frozen params x bytes(model.torch_dtype)
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

from phi3lit.errors import missing_model
from phi3lit.lora import LoraSpec, apply_lora, effective_trainable, trainable_by_module
from phi3lit.tiny import resolve_pretrained

# Architecture of microsoft/Phi-3-mini-4k-instruct (its config.json), so planning needs no download.
KNOWN = {
    "microsoft/Phi-3-mini-4k-instruct": dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, sliding_window=2047,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
        pad_token_id=32000,
    ),
}  # fmt: skip
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


def load_config(pretrained: str):
    from transformers import AutoConfig, Phi3Config

    if pretrained in KNOWN:
        return Phi3Config(**KNOWN[pretrained])
    try:
        return AutoConfig.from_pretrained(resolve_pretrained(pretrained))
    except OSError as e:
        raise missing_model(pretrained, e) from None


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

    one = config.__class__(**{**config.to_dict(), "num_hidden_layers": 1})
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_config(one, attn_implementation="sdpa", dtype=dtype), lora).train()
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    probe = 64
    ids = torch.randint(3, min(one.vocab_size, 1000), (1, probe))
    return saved_bytes(model, ids) / probe


def estimate(
    pretrained: str,
    lora: LoraSpec,
    torch_dtype: str,
    precision: str,
    micro_batch: int,
    max_length: int,
    gradient_checkpointing: bool,
) -> dict:
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
    parts = {
        "frozen weights": (total - adapter_numel) * BYTES[torch_dtype],
        "LoRA weights + grads + AdamW": adapter_numel * lora_bytes * 4,
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
    lines.append("training memory estimate (one device):")
    for k, v in result["memory"].items():
        lines.append(f"  {k:<30} {v / gib:8.2f} GiB")
    lines.append(f"  {'total':<30} {result['memory_total'] / gib:8.2f} GiB  (+5-15% allocator overhead)")
    return "\n".join(lines)


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
    )
    title = f"{hp.pretrained} ({cli.trainer.precision}, micro-batch {dhp.batch_size} x {dhp.max_length} tokens)"
    return report(result, title)
