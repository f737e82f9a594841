"""The model layer: the LightningModule (`module.Phi3LoRA`) and what it is made of (LoRA, the loss, packed
attention, RoPE per conversation, the optimizer and schedule, quantization, generation, the non-finite guard).
Imports the base and `phi3lit.data` only."""
