"""Tools over runs: `plan` (will it fit), `sweep/` (ablate, summaries, statistics) and `analysis/` (what LoRA
learned). The top layer below the command line: may import every other layer."""
