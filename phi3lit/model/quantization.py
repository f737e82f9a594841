"""QLoRA (Dettmers et al. 2023): the frozen base stored as 4-bit NormalFloat, LoRA trained on top in bf16 compute.

`model.quantization: nf4` hands transformers this BitsAndBytesConfig at load time; the LoRA weights stay fp32.
Another scheme (8-bit, other quantizers) is one more branch here.
"""

from __future__ import annotations

import importlib.util

import torch

from phi3lit.errors import EnvironmentProblem


def quantization_config(kind: str | None):
    """transformers' BitsAndBytesConfig for QLoRA (Dettmers et al. 2023): NF4, double quantization, bf16 compute."""
    if kind is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise EnvironmentProblem(
            f"model.quantization={kind} needs bitsandbytes: pip install 'phi3lit[qlora]' "
            "(fast on CUDA GPUs; recent versions also run 4-bit on CPU)"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
