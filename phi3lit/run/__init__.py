"""The run layer: the Lightning harness around a fit (callbacks, telemetry, progress, resume rules, preemption,
config checks, the run folder). Imports the base, `phi3lit.data` and `phi3lit.model` only."""
