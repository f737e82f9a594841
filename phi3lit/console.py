"""What a user sees on the terminal: phi3lit's own lines, the progress bar and real problems, not library chatter.

Libraries phi3lit drives print things that say nothing to its users, or nothing they can act on: transformers'
deprecation notices about methods phi3lit does not call itself, Lightning's advert for its logger service and its
pytree deprecation, bitsandbytes looking for an optional CPU kernel package (and `kernels` saying it cannot check
that package's publisher offline). `quiet()` filters exactly those, by
message, so anything else (a real warning) still shows. `plan` and `data` only read a config, so there Lightning's
start-up lines (seed, devices, precision) are left out too: they print their report and nothing else.
"""

from __future__ import annotations

import logging
import warnings

# (category, message regex) of Python warnings that are noise for a phi3lit user.
WARNINGS = (
    (FutureWarning, r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated"),  # peft/transformers
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # Lightning's pytree helper on torch >= 2.10
    (UserWarning, r"LightningCLI's args parameter"),  # phi3lit passes its own argv on purpose
)
# Log lines (start of the message) that are noise everywhere.
LOG_LINES = (
    "💡 Tip:",  # Lightning's advert for its hosted logger
    "Failed to load CPU gemm_4bit_forward",  # bitsandbytes: an optional kernels package for 4-bit on CPU
    "Skipping publisher trust check for 'kernels-community/",  # kernels, asked by bitsandbytes, when hub is offline
    "`weights_only` was not set",  # Lightning reading phi3lit's own checkpoints (they hold configs and RNG states)
)
# Lightning's start-up lines: useful before training, noise before a report that loads nothing.
STARTUP_LINES = ("Seed set to", "GPU available:", "TPU available:", "HPU available:", "Using ", "Trainer already")


class _DropLines(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


# The loggers those lines are created on (a filter on a logger sees only its own records).
LOGGERS = (
    "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.fabric.utilities.seed",
    "bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub",
)  # fmt: skip


def quiet(report_only: bool = False) -> None:
    """Install the filters (again: the last call decides). `report_only`: also drop Lightning's start-up lines, for
    `plan` and `data`."""
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    prefixes = LOG_LINES + (STARTUP_LINES if report_only else ())
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _DropLines)]:
            logger.removeFilter(f)
        logger.addFilter(_DropLines(prefixes))
