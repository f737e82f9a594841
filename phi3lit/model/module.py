"""The LightningModule: a Hugging Face Phi-3 causal LM with peft LoRA adapters.

Loss normalisation. A packed row carries a varying number of trained (assistant) tokens, so "mean of
per-batch means" weights tokens unevenly. phi3lit instead makes every optimizer step minimise

    sum of token losses over all micro-batches and ranks of the step / trained tokens of the step

which is what one big batch would give. `training_step` returns the *summed* token loss of its
micro-batch; Lightning divides it by `accumulate_grad_batches` and DDP averages over ranks, so in
`on_before_optimizer_step` (after the last backward, before clipping) the gradients are multiplied by
`accumulate_grad_batches * world_size / trained_tokens_of_step` (times `LOSS_UNIT_TOKENS`: the summed loss is
backpropagated in units of that many tokens, which keeps fp16 loss scaling in range). The token count is
all-reduced once per optimizer step, not per micro-batch.

The module never moves tensors between devices or casts for precision: the Trainer owns both.
Checkpoints hold only the trainable (LoRA) tensors; the frozen base is reloaded from `pretrained`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import SumMetric

from phi3lit.checkpoint import rng_states, set_rng_states
from phi3lit.data.labels import loss_index
from phi3lit.errors import CheckpointError, ConfigError, EnvironmentProblem, missing_model
from phi3lit.family import check_phi3
from phi3lit.hub import resolve_pretrained
from phi3lit.lightning_compat import logging_this_step
from phi3lit.model.adapter import check_adapter_matches, read_adapter_config
from phi3lit.model.attention import document_kwargs  # importing it registers the sdpa_docs attention
from phi3lit.model.fused_lora import fuse_lora_layers
from phi3lit.model.generate import generate_ids
from phi3lit.model.guard import NonFiniteGuard
from phi3lit.model.lora import (
    LoraSpec,
    apply_lora,
    check_rank,
    effective_trainable,
    install_slice_masks,
    logical_numel,
    lora_state_dict,
    shard_fsdp2,
    trainable_summary,
)
from phi3lit.model.loss import chunked_cross_entropy
from phi3lit.model.norms import lora_delta_norms
from phi3lit.model.optim import WarmupCosine, default_optimizer, default_scheduler
from phi3lit.model.quantization import quantization_config
from phi3lit.model.rope import install_document_rope

LOSS_UNIT_TOKENS = 1024  # the unit the summed loss is backpropagated in; a power of two, so undone exactly
SHARDED = FSDPStrategy | DeepSpeedStrategy | ModelParallelStrategy  # parameters are shards, not whole tensors


class Phi3LoRA(L.LightningModule):
    strict_loading = False  # checkpoints hold LoRA tensors only; the base comes from `pretrained`

    def __init__(
        self,
        pretrained: str = "builtin:tiny-phi3",
        lora: LoraSpec = LoraSpec(),  # noqa: B008 (a frozen-by-convention default, jsonargparse shows it)
        torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32",
        attn_implementation: Literal["sdpa_docs", "sdpa", "eager", "flash_attention_2"] = "sdpa_docs",
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable = default_scheduler,
        max_new_tokens: int = 64,
        adapter: str | None = None,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        max_skipped_steps: int = 10,
        lora_fp32: bool = True,
        quantization: Literal["nf4"] | None = None,
        ce_chunk: int = 1024,
        compile: bool = False,
        fused_lora: bool = True,
    ):
        """
        Args:
            pretrained: hub id (`microsoft/Phi-3-mini-4k-instruct`), local model folder, or the offline
                `builtin:tiny-phi3`. The tokenizer is read from the same place.
            lora: LoRA rank, alpha, dropout and target modules.
            torch_dtype: dtype the frozen base weights are loaded in.
            attn_implementation: `sdpa_docs` (phi3lit.model.attention): SDPA once per packed conversation, causal, no
                mask; `sdpa`/`eager`: transformers' kernels with a dense block-diagonal mask (references);
                `flash_attention_2`: varlen flash-attn over the same conversations (CUDA).
            gradient_checkpointing: recompute activations in backward (non-reentrant) to save memory.
            optimizer: builds the optimizer over the trainable parameters; linked from the CLI's `optimizer:`
                (default: fused AdamW, lr 2e-4; see phi3lit.model.optim).
            lr_scheduler: builds the per-step schedule; linked from the CLI's `lr_scheduler:` (default: linear
                warmup, then cosine decay, phi3lit.model.optim.WarmupCosine).
            max_new_tokens: reply length limit for `predict`.
            adapter: a saved peft adapter folder to start from instead of fresh LoRA weights (e.g. to `predict`
                or `test` with `<run>/adapter`); `lora` must then describe the same adapter.
            on_nonfinite: a NaN/inf loss or gradient norm is never applied (the step is skipped on the device);
                `stop` ends training at the next check (every `trainer.log_every_n_steps`), `skip` goes on.
            max_skipped_steps: with `skip`, stop anyway after this many skipped steps.
            lora_fp32: keep LoRA weights (and so AdamW's state) in fp32 even under `trainer.precision=bf16-true`,
                which otherwise casts the whole module to bf16.
            quantization: `nf4` loads the frozen base in 4-bit NormalFloat with double quantization and bf16
                compute (QLoRA; needs the `qlora` extra: bitsandbytes, CUDA).
            ce_chunk: compute the LM head and cross-entropy over this many trained positions at a time, with the
                gradient taken in the same pass (phi3lit.model.loss), so at most `ce_chunk x vocab` fp32 logits exist at
                once and none are kept for backward (0: all logits at once, through autograd).
            compile: `torch.compile` each decoder layer (fuses norms, RoPE, SiLU and the LoRA adds; attention stays
                eager because document offsets change every batch). The first steps pay the compile time.
            fused_lora: each adapted Linear as one autograd Function (phi3lit.model.fused_lora), equal to peft's
                forward to float rounding and without its full-size temporaries; false runs peft's own forward.
        """
        super().__init__()
        for key, value in (("ce_chunk", ce_chunk), ("max_skipped_steps", max_skipped_steps)):
            if value < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {value}")
        # RunConfig logs the whole resolved config instead; the optimizer and schedule are callables, kept as such.
        self.save_hyperparameters(logger=False, ignore=["optimizer", "lr_scheduler"])
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.lora = lora
        self.tokenizer = None
        self.model = None  # built in configure_model, so parsing a config never loads weights
        self.val_loss_sum, self.val_tokens, self.val_correct = SumMetric(), SumMetric(), SumMetric()
        self._step_loss = self._step_tokens = None
        self.guard = NonFiniteGuard(on_nonfinite, max_skipped_steps)

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        hp = self.hparams
        if hp.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise EnvironmentProblem(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package (CUDA GPUs only): "
                "pip install flash-attn --no-build-isolation, or use model.attn_implementation=sdpa"
            )
        path = resolve_pretrained(hp.pretrained)
        try:
            config = AutoConfig.from_pretrained(path)
        except OSError as e:
            raise missing_model(hp.pretrained, e) from None
        except ValueError as e:  # a model_type this transformers does not know
            raise ConfigError(f"model.pretrained={hp.pretrained!r}: not a Phi3ForCausalLM ({e})") from None
        check_phi3(config, hp.pretrained)  # before reading any weights
        check_rank(self.lora, config)  # before reading any weights too
        base = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=hp.torch_dtype if hp.torch_dtype == "auto" else getattr(torch, hp.torch_dtype),
            attn_implementation=hp.attn_implementation,
            quantization_config=quantization_config(hp.quantization),
        )
        install_document_rope(base)  # LongRoPE: short/long factors per packed conversation, as inference sees it
        if hp.quantization:
            from peft import prepare_model_for_kbit_training

            # Casts norms to fp32 and enables input grads, as QLoRA prescribes; checkpointing is set up below.
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        if hp.gradient_checkpointing:
            # Non-reentrant checkpointing propagates grads to LoRA weights even though the frozen
            # embedding output has requires_grad=False; input grads are enabled for reentrant-safe peft paths.
            non_reentrant = {"use_reentrant": False}
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
            base.enable_input_require_grads()
        if hp.adapter:
            from peft import PeftModel

            read_adapter_config(hp.adapter, "model.adapter")  # a missing or partial folder is named, not a traceback
            try:
                self.model = PeftModel.from_pretrained(base, hp.adapter, is_trainable=True)
            except Exception as e:  # a truncated or foreign adapter_model.safetensors
                raise ConfigError(f"model.adapter={hp.adapter}: cannot load it ({type(e).__name__}: {e})") from None
            check_adapter_matches(self.model.peft_config["default"], self.lora, hp.adapter)
            install_slice_masks(self.model, self.lora, base.config)  # the zero blocks must stay zero here too
        else:
            self.model = apply_lora(base, self.lora)
        if hp.fused_lora:
            fuse_lora_layers(self.model)
        # from_pretrained returns the model in eval mode and Lightning keeps the modes it finds (the eval and
        # predict loops switch and restore them), so set train mode here: transformers checkpoints a layer only
        # when `self.training`, and LoRA dropout is active only then.
        self.model.train()
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 (configs/strategy/fsdp2.yaml)
            shard_fsdp2(self.model, self.device_mesh["data_parallel"])
        if hp.compile:
            for layer in base.model.layers:  # the layers share code, so they share the compiled graphs
                layer.compile(dynamic=True)  # row widths vary by batch: one graph for all of them
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(hp.pretrained))  # for decoding replies

    def param_counts(self) -> tuple[int, int]:
        """(effective trainable parameters, all parameters); off-slice zero blocks are not trainable."""
        return effective_trainable(self.model), sum(logical_numel(p) for p in self.model.parameters())

    def on_fit_start(self) -> None:
        if self.hparams.lora_fp32:
            # bf16-true casts the whole module after configure_model; bring the trainable weights back to fp32
            # (peft casts the LoRA input to the adapter's dtype). AdamW creates its state lazily, so it is fp32 too.
            for p in self.parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
        rank_zero_info(trainable_summary(self.model, self.lora))

    # ------------------------------------------------------------------ loss
    def token_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum of next-token cross-entropies over trained positions, number of them, number predicted right).

        Logits are computed only at trained positions: the LM head over all positions would cost
        `tokens x 32064` floats for nothing when only assistant tokens are trained.
        """
        causal_lm = self.model.get_base_model()
        hidden = causal_lm.model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            use_cache=False,  # with a cache, transformers ignores position_ids for the packed mask
            **document_kwargs(batch, self.hparams.attn_implementation),
        ).last_hidden_state
        index = batch.get("loss_index")
        if index is None:  # a batch not made by collate: find the trained positions here
            index = loss_index(batch["labels"])
        targets = batch["labels"].flatten().index_select(0, index + 1)  # the next token, in the same row
        loss_sum, correct = chunked_cross_entropy(
            hidden.flatten(0, 1).index_select(0, index), causal_lm.lm_head, targets, self.hparams.ce_chunk
        )
        return loss_sum, torch.full((), index.numel(), device=targets.device), correct

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Restored here, not at load time, so that nothing Lightning does in between shifts the streams.
        if getattr(self, "_rng_to_restore", None) is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss_sum, n, _ = self.token_losses(batch)
        if self._deepspeed:  # gradients live in DeepSpeed's partitions: fall back to a per-micro-batch mean
            self.log("train/loss", loss_sum.detach() / n.clamp_min(1), prog_bar=True)
            return loss_sum / n.clamp_min(1)
        if self._step_loss is None:
            self._step_loss, self._step_tokens = torch.zeros_like(loss_sum), torch.zeros_like(n)
            self._step_sources = []
        self._step_sources += batch.get("sources", [])
        self._step_loss += loss_sum.detach()
        self._step_tokens += n
        # Backpropagate the sum in units of LOSS_UNIT_TOKENS, so gradients have about the size of a mean loss's:
        # under fp16 GradScaler a sum over thousands of tokens would overflow for many steps before the scale came
        # down. The constant is undone in on_before_optimizer_step (exactly: it is a power of two).
        return loss_sum / LOSS_UNIT_TOKENS

    @property
    def _deepspeed(self) -> bool:
        return isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._deepspeed:
            return
        strategy = self.trainer.strategy
        # fp16 AMP (16-mixed): Lightning leaves unscaling to a fused optimizer's step, so the gradients here are
        # still multiplied by the loss scale. Unscale now, so the norm, clipping and the guard see the true ones;
        # GradScaler's step then passes `found_inf` from this unscale to fused AdamW and skips overflowed steps.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scaler.unscale_(optimizer)
        tokens = strategy.reduce(self._step_tokens.float(), reduce_op="sum").clamp_min(1)
        loss = strategy.reduce(self._step_loss, reduce_op="sum") / tokens
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size * LOSS_UNIT_TOKENS / tokens
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
        self._step_loss = self._step_tokens = None
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)  # before clipping
        if isinstance(strategy, FSDPStrategy):  # each rank holds a shard of every gradient: combine the squares
            norm = strategy.reduce(norm.float() ** 2, reduce_op="sum").sqrt()
        elif hasattr(norm, "full_tensor"):  # FSDP2: the norm of DTensor shards is global already (a replicated DTensor)
            norm = norm.full_tensor()
        self._grad_norm = norm  # clipping (configure_gradient_clipping) uses it, so the norm is taken once
        # Flags a NaN/inf step on the device and makes the optimizer skip it (phi3lit.model.guard: no host sync).
        self.guard.record(
            self.trainer.global_step, loss, norm, self._step_sources, optimizer, strategy, scaled=scaler is not None
        )
        self.log("train/loss", loss, prog_bar=True)
        # Lightning takes a logged "step" as the x of every metric logged with it: the count of optimizer steps
        # done including this one, so step 50 in TensorBoard is the state checkpoints/step=000050.ckpt holds.
        self.log("step", float(self.trainer.global_step + 1))
        self.log("train/lr", optimizer.param_groups[0]["lr"])
        self.log("train/grad_norm", norm)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """`trainer.gradient_clip_val` applied here, on the token-normalised, unscaled gradients.

        Lightning's AMP plugin refuses to clip for an optimizer that unscales inside its step (fused AdamW), under
        bf16-mixed as well as 16-mixed; here the gradients are already unscaled (on_before_optimizer_step), so
        clipping is plain arithmetic, with the norm taken there (global under FSDP).
        """
        if self._deepspeed:  # DeepSpeed clips inside its engine (Lightning passes gradient_clip_val to it)
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self._grad_norm)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        # Every log_every_n_steps optimizer steps (when Lightning reads the logged tensors anyway) and at the end.
        if self.guard.pending and (logging_this_step(self.trainer) or self.trainer.should_stop):
            self.guard.check(self.log, self.trainer.global_step)

    def on_train_end(self) -> None:
        if self.guard.pending:
            self.guard.check(self.log, self.trainer.global_step)

    def _eval_step(self, batch: dict) -> None:
        loss_sum, n, correct = self.token_losses(batch)
        self.val_loss_sum.update(loss_sum)
        self.val_tokens.update(n)
        self.val_correct.update(correct)

    def _eval_epoch_end(self, prefix: str) -> None:
        # Token-weighted over the whole set (and all ranks: torchmetrics syncs), not a mean of batch means.
        tokens = self.val_tokens.compute().clamp_min(1)
        loss = self.val_loss_sum.compute() / tokens
        self.log(f"{prefix}/loss", loss, prog_bar=True)
        self.log("step", float(self.trainer.global_step))  # the x of the state evaluated (see on_before_optimizer_step)
        self.log(f"{prefix}/ppl", torch.exp(loss))
        self.log(f"{prefix}/token_acc", self.val_correct.compute() / tokens)
        if prefix == "val" and not isinstance(self.trainer.strategy, SHARDED):
            # Where the adaptation goes: ‖scale·B·A‖_F per module (or slice), from the weights alone (r x r products).
            self.log_dict(lora_delta_norms(self.model, per_layer=False))
        for metric in (self.val_loss_sum, self.val_tokens, self.val_correct):
            metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        """Greedy replies to left-padded prompts (the KV cache is used here and only here)."""
        replies = generate_ids(
            self.model, self.tokenizer, batch["input_ids"], batch["attention_mask"], self.hparams.max_new_tokens
        )
        return [self.tokenizer.decode(r, skip_special_tokens=True) for r in replies]

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        optimizer = self.optimizer([p for p in self.parameters() if p.requires_grad])
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, WarmupCosine) and scheduler.total_steps is None:
            scheduler.set_total_steps(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def adapter_state_names(self) -> set[str]:
        """What checkpoints hold: the adapter's own state (`lora.lora_state_dict`), which is what trains."""
        return set(lora_state_dict(self, self.lora.bias))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.adapter_state_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        # The latest metrics ride along for the exported adapter's model card.
        checkpoint["phi3lit"] = {"pretrained": self.hparams.pretrained, "lora": asdict(self.lora), "metrics": metrics}
        checkpoint["rng"] = rng_states()  # Lightning does not save them; LoRA dropout needs them to resume exactly

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("phi3lit", {}).get("lora")
        if saved is not None and saved != asdict(self.lora):
            diff = {k: (saved.get(k), v) for k, v in asdict(self.lora).items() if saved.get(k) != v}
            raise CheckpointError(
                "checkpoint LoRA config differs from this run's: "
                + "; ".join(f"model.lora.{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diff.items())
            )
        self._rng_to_restore = checkpoint.get("rng")
        if self.model is not None and "state_dict" in checkpoint:  # ModelParallelStrategy has loaded it already
            missing = self.adapter_state_names() - set(checkpoint["state_dict"])
            if missing:
                raise CheckpointError(f"checkpoint lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[0]}")
