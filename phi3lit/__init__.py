"""phi3lit: LoRA fine-tuning of Phi-3 on chat data with PyTorch Lightning."""

__version__ = "0.1.0"
