"""`analyze`: the LoRA paper's analysis of saved adapters (`deltas`: the quantities, `figures`: the plots)."""
