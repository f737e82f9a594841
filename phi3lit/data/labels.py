"""Which positions are trained: the label that means "not trained", and the flat index of trained positions.

Defined once, in the data layer that writes the labels; the model's loss, the token counts that normalise it and
the monitor's throughput all read them from here.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # torch cross-entropy's ignore_index: a label that is not trained


def loss_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions (row * T + t) of a (rows, T) batch whose next token, t + 1 in the same row, is trained.

    The one definition of "which positions are trained": the collate function computes it for every batch and the
    model's loss, the token counts that normalise it and the monitor's throughput all read it.
    """
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols
