"""Config checks that run before anything loads: a value that parses but cannot work fails here, in one line that
names its key, on any machine (values and strategy combinations), then what this machine cannot do (devices)."""

from __future__ import annotations

import importlib.util
import math

from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_info

from phi3lit.errors import ConfigError, EnvironmentProblem
from phi3lit.model.lora import resolve_targets


def check_values(config) -> None:
    """Values that parse but cannot work fail here, before anything loads, naming their key."""
    trainer, data = config.trainer, config.data
    if trainer.max_steps == 0 or trainer.max_epochs == 0:
        key = "max_steps" if trainer.max_steps == 0 else "max_epochs"
        raise ConfigError(f"trainer.{key}=0 trains nothing (and would still write an untrained adapter)")
    if trainer.max_steps is not None and trainer.max_steps < -1:
        raise ConfigError(f"trainer.max_steps must be positive, or -1 for max_epochs; got {trainer.max_steps}")
    if trainer.accumulate_grad_batches is not None and trainer.accumulate_grad_batches < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches must be at least 1, got {trainer.accumulate_grad_batches}")
    clip = trainer.gradient_clip_val
    if clip is not None and not (math.isfinite(clip) and clip >= 0):
        raise ConfigError(f"trainer.gradient_clip_val must be a finite number >= 0 (0 or null: off), got {clip}")
    optim = (config.get("optimizer") or Namespace()).get("init_args") or Namespace()
    lr = optim.get("lr")
    if isinstance(lr, int | float) and not (math.isfinite(lr) and lr >= 0):  # torch would accept NaN silently
        raise ConfigError(f"optimizer.init_args.lr must be a finite number >= 0, got {lr}")  # 0: keep the adapter
    if data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be at least 1, got {data.batch_size}")
    if data.get("val_batch_size") is not None and data.val_batch_size < 1:
        raise ConfigError(f"data.val_batch_size must be at least 1 (null: batch_size), got {data.val_batch_size}")
    if trainer.log_every_n_steps is not None and trainer.log_every_n_steps < 1:  # phi3lit logs every N steps
        raise ConfigError(f"trainer.log_every_n_steps must be at least 1, got {trainer.log_every_n_steps}")
    every = (config.get("checkpoint") or Namespace()).get("every_n_train_steps")
    if every is not None and every < 0:
        raise ConfigError(f"checkpoint.every_n_train_steps must be >= 0 (0 or null: no step checkpoints), got {every}")
    if data.get("num_workers") is not None and data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 (0: load in the main process), got {data.num_workers}")
    if config.get("weights_only") is False:  # Lightning's option to unpickle a checkpoint (code in it would run)
        raise ConfigError(
            "weights_only=false: phi3lit loads checkpoints weights-only (tensors and plain data), never by "
            "unpickling code they name; drop the option"
        )
    if not data.val_file and data.val_fraction > 0.5:  # a typo for 0.0999 would train on a sliver of the data
        raise ConfigError(
            f"data.val_fraction={data.val_fraction} holds out more than half of data.train_file for validation; "
            "use a fraction up to 0.5, or give the validation set as data.val_file"
        )


def check_positions(config) -> None:
    """data.max_length against the model's positions: the one place both configs are in view, before anything
    loads. The model's config.json values come from the family table for hub ids (nothing downloads here) or from
    the folder's own file; a name neither knows is left to transformers to explain when it loads."""
    import json
    from pathlib import Path

    from phi3lit.family import member
    from phi3lit.hub import resolve_pretrained

    if "data" not in config or "model" not in config:
        return
    pretrained, max_length = config.model.pretrained, config.data.max_length
    known = member(pretrained)
    if known is not None:
        positions = known.config["max_position_embeddings"]
    else:
        try:
            path = Path(resolve_pretrained(pretrained)) / "config.json"
            positions = json.loads(path.read_text()).get("max_position_embeddings") if path.is_file() else None
        except (OSError, ValueError):
            return
    if isinstance(positions, int) and max_length > positions:
        raise ConfigError(f"data.max_length={max_length} exceeds the model's {positions} positions")


def check_strategy(config) -> None:
    """Combinations with a sharding strategy that phi3lit has not verified are refused, not run unverified.

    Lightning's FSDP (FSDP1) and DeepSpeed run only on GPUs, so nothing here exercises them; FSDP2
    (`ModelParallelStrategy`, configs/strategy/fsdp2.yaml) is verified on the CPU with gloo, for what
    `_check_fsdp2` lets through. Two parts of phi3lit are known not to carry over as they are: slice targets hold
    their zero blocks with gradient hooks on the original LoRA parameters, which sharded parameters bypass; and
    sample replies are generated on rank 0 alone, which deadlocks where every forward needs all ranks.
    """
    strategy = str(config.trainer.strategy).lower()
    fsdp2 = "modelparallelstrategy" in strategy
    if not (fsdp2 or "fsdp" in strategy or "deepspeed" in strategy):
        return
    name = "FSDP2" if fsdp2 else "FSDP" if "fsdp" in strategy else "DeepSpeed"
    plugins = config.trainer.plugins
    plugins = plugins if isinstance(plugins, list) else [plugins]
    if any("AtomicCheckpointIO" in str(getattr(p, "class_path", p)) for p in plugins):
        raise ConfigError(
            f"trainer.plugins: phi3lit.checkpoint.AtomicCheckpointIO writes one local file per checkpoint; {name} "
            "writes its own (gathered or sharded) checkpoints with its own IO: set trainer.plugins null (the "
            "configs/strategy overlays do)"
        )
    sliced = [m for m, s in resolve_targets(config.model.lora.targets).items() if s is not None]
    if sliced:
        raise ConfigError(
            f"model.lora.targets={config.model.lora.targets} adapts slices of {', '.join(sliced)}, whose zero blocks "
            f"are held by gradient hooks that {name}'s sharded parameters bypass: target whole modules (qkv_proj, "
            "gate_up_proj) under this strategy, or use DDP"
        )
    if config.samples.prompts or config.samples.prompts_file:
        raise ConfigError(
            f"samples.prompts: sample replies are generated on rank 0 alone, which would deadlock under {name} (every "
            "forward needs all ranks); set samples.prompts=[] and samples.prompts_file=null, and use predict after fit"
        )
    if fsdp2:
        _check_fsdp2(config)
    else:
        rank_zero_info(
            f"[phi3lit] warning: trainer.strategy {name} is untested here (no GPU run has verified it; see "
            "docs/scaling.md); configs/strategy/fsdp2.yaml is the sharded path the test suite runs"
        )


def _check_fsdp2(config) -> None:
    """What phi3lit's FSDP2 sharding (Phi3LoRA.configure_model) covers; the rest is refused, naming the key."""
    trainer, model = config.trainer, config.model
    args = config.trainer.strategy.get("init_args") or Namespace()
    dp, tp = args.get("data_parallel_size", "auto"), args.get("tensor_parallel_size", "auto")
    if tp != 1:
        raise ConfigError(
            f"trainer.strategy.init_args.tensor_parallel_size={tp}: phi3lit shards with FSDP2 only (no tensor "
            "parallelism); set it to 1 (configs/strategy/fsdp2.yaml does)"
        )
    devices = trainer.devices
    devices = int(devices) if isinstance(devices, int) or str(devices).isdigit() else None
    processes = devices * (trainer.num_nodes or 1) if devices is not None else None
    if not isinstance(dp, int) or (processes is not None and dp != processes):
        raise ConfigError(
            f"trainer.strategy.init_args.data_parallel_size={dp}: FSDP2 shards over all processes, so it must be "
            f"trainer.devices x trainer.num_nodes ({trainer.devices} x {trainer.num_nodes or 1}); set both"
        )
    trained = set(model.lora.modules_to_save) | set(resolve_targets(model.lora.targets))
    head = sorted(m for m in trained if m in ("lm_head", "embed_tokens", "embed"))
    if head:
        raise ConfigError(
            f"model.lora: {', '.join(head)} trained under FSDP2 is not verified (the LM head is kept whole on every "
            "rank and read directly by the fused loss): train the decoder layers only, or use DDP"
        )
    for key, value, why in (
        ("quantization", model.quantization, "bitsandbytes 4-bit weights are not sharded by FSDP2 here"),
        ("compile", model.compile, "torch.compile of sharded layers is not verified"),
    ):
        if value:
            raise ConfigError(f"model.{key}={value}: not supported under FSDP2 ({why}); drop it or use DDP")


def check_devices(config) -> None:
    """Settings that need a GPU fail here, before anything loads, with the key that asks for it."""
    import torch

    cuda = torch.cuda.is_available() and config.trainer.accelerator in ("auto", "gpu", "cuda")
    precision = str(config.trainer.precision)
    if precision.startswith("transformer-engine") and not cuda:
        raise EnvironmentProblem(f"trainer.precision={precision} (FP8) is GPU-only: use 32-true or bf16-mixed on CPU")
    if "bf16" in precision and cuda and not torch.cuda.is_bf16_supported():
        raise EnvironmentProblem(f"trainer.precision={precision}: this GPU has no bf16; use 16-mixed")
    if precision.startswith("bf16-true") and not cuda:
        rank_zero_info(
            f"[phi3lit] hint: trainer.precision={precision} on a CPU runs bf16 matmuls without fast kernels (a review "
            "measured ~40x slower than 32-true on a 2-core CPU); 32-true is the CPU setting, bf16 is for GPUs"
        )
    strategy = str(config.trainer.strategy).lower()
    if "fsdp" in strategy and not cuda:
        raise EnvironmentProblem(
            "trainer.strategy is FSDP, which Lightning runs only on CUDA GPUs: on this machine use "
            "configs/strategy/ddp.yaml (several CPU processes with gloo) or no strategy"
        )
    if "deepspeed" in strategy and importlib.util.find_spec("deepspeed") is None:
        raise EnvironmentProblem(
            "trainer.strategy uses DeepSpeed, which is not installed: pip install 'phi3lit[deepspeed]'"
        )
    if config.model.attn_implementation == "flash_attention_2" and not cuda:
        raise EnvironmentProblem(
            "model.attn_implementation=flash_attention_2 is GPU-only (CUDA): use sdpa on this machine"
        )
