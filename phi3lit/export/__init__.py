"""The export layer: what leaves a run (the peft adapter in the form each client reads, merged models, `chat`).
Imports the layers below it (base, data, model, run)."""
