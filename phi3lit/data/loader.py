"""Loading packed rows in an order that survives a resume exactly.

Training order is exact across resumes: the position in an epoch is kept as positions of the epoch's global order
(see `ResumableSampler`), so a run may resume with another batch size or number of devices. `PackedRows` reads rows
on demand from the memory-mapped tokenized dataset, so a large dataset never sits in Python lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler

from phi3lit.data.labels import IGNORE_INDEX
from phi3lit.lightning_compat import batches_processed


def _deal(indices: list[int], num_replicas: int, rank: int, drop_last: bool = False) -> list[int]:
    """Rank `rank`'s share of a global order, exactly as DistributedSampler deals it: positions rank, rank + W, ...
    after padding the order to a multiple of W by repeating it from the start (or cutting it, with drop_last)."""
    if not indices:
        return []
    if drop_last:
        indices = indices[: len(indices) - len(indices) % num_replicas]
    else:
        total = math.ceil(len(indices) / num_replicas) * num_replicas
        indices = (indices * math.ceil(total / len(indices)))[:total]
    return indices[rank::num_replicas]


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way through, for exact mid-epoch resume.

    The position is counted in the epoch's global order (the one permutation of all rows per (seed, epoch) that
    DistributedSampler draws; rank r reads positions r, r + W, ...), so a run can resume on another number of
    ranks or with another batch size: the rows not yet read are dealt to the new ranks the same way. An epoch
    that is not resumed is exactly DistributedSampler's.
    """

    resume: tuple[int, int] | None = None  # (epoch, positions of that epoch's global order already read)

    def global_order(self) -> list[int]:
        """This epoch's order of all rows, before padding and dealing (DistributedSampler's)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(len(self.dataset), generator=g).tolist()
        return list(range(len(self.dataset)))

    def left(self, skip: int) -> int:
        """Rows this rank reads in an epoch whose first `skip` positions were read already."""
        rest = max(0, len(self.dataset) - skip)
        if self.drop_last:
            return rest // self.num_replicas
        return math.ceil(rest / self.num_replicas)

    def __iter__(self):
        resume, self.resume = self.resume, None
        if resume is None or resume[0] != self.epoch:
            return super().__iter__()
        rest = self.global_order()[min(resume[1], len(self.dataset)) :]
        return iter(_deal(rest, self.num_replicas, self.rank, self.drop_last))


class ScoredOnceSampler(DistributedSampler):
    """Validation and test order for rank `rank` of W: every row is scored exactly once, on any number of ranks.

    DistributedSampler evens the ranks out by repeating the first rows, so a validation set of 13 rows on 2 ranks
    would score row 0 twice. Here the repeats are still read (every rank runs the same number of batches, so
    collective calls under DDP stay in step) but as `(row, False)`: `PackedRows` then gives the row with no trained
    token, so it adds nothing to the loss, the token count or the accuracy. Real rows come as `(row, True)`.
    """

    def __init__(self, dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):
        n = len(self.dataset)
        keyed = [(i % n, i < n) for i in range(self.total_size)]  # positions past n: DistributedSampler's repeats
        return iter(keyed[self.rank :: self.num_replicas])

    def scored_rows(self, rank: int, batches: int, batch_size: int) -> list[int]:
        """The rows rank `rank` scores in its first `batches` batches (what `limit_val_batches` keeps)."""
        n = len(self.dataset)
        return [i for i in range(self.total_size)[rank :: self.num_replicas][: batches * batch_size] if i < n]


class ResumableLoader(DataLoader):
    """Lightning saves `state_dict()` in checkpoints and calls `load_state_dict()` on resume.

    The state is the epoch, the number of batches the training loop has processed in it (taken from the loop, not
    from this iterator, which Lightning prefetches ahead) and `samples`, how many positions of the epoch's global
    order those batches read on all ranks together. A resumed run reads exactly the rows an uninterrupted run
    would have read next, whatever its batch size and number of ranks. States without `samples` (older
    checkpoints) are read as taken with the current batch size and ranks.
    """

    trainer = None
    # (epoch, batches, samples) this loader resumed from: the loop keeps counting batches from there, in batches
    # of the new size, so positions read since then are counted from it.
    _base: tuple[int, int, int] | None = None

    def _per_batch(self) -> int:
        return self.batch_size * self.sampler.num_replicas  # positions of the global order one micro-batch reads

    def state_dict(self) -> dict:
        done = batches_processed(self.trainer) if self.trainer else 0
        epoch, base = self.sampler.epoch, self._base
        if base is not None and base[0] == epoch and done >= base[1]:
            samples = base[2] + (done - base[1]) * self._per_batch()
        else:
            samples = done * self._per_batch()
        return {"epoch": epoch, "batches": done, "samples": samples}

    def load_state_dict(self, state: dict) -> None:
        samples = state.get("samples", state["batches"] * self._per_batch())
        self.sampler.resume = (state["epoch"], samples)
        self._base = (state["epoch"], state["batches"], samples)

    def __len__(self) -> int:
        # Lightning ends an epoch after len() batches, counting on from the batches the checkpoint had processed.
        # After a resume with a larger batch size or more ranks, those were smaller batches, so make room for all
        # the batches left (a length too large is harmless: the epoch also ends when the sampler runs out).
        n = super().__len__()
        if getattr(self.sampler, "resume", None) is not None and self._base is not None:  # training only
            n = max(n, self._base[1] + math.ceil(self.sampler.left(self.sampler.resume[1]) / self.batch_size))
        return n


class PackedRows(Sequence):
    """Packed rows read on demand from a tokenized (memory-mapped) dataset: `rows[r]` is a list of conversations."""

    def __init__(self, dataset, index: list[list[int]], locations: list[str] | None = None):
        self.dataset = dataset.select_columns(["input_ids", "labels"])
        self.index = index
        self.locations = locations

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, bool]) -> list[dict[str, list[int]]]:
        """Row `key`, or for `(row, scored)` (from `ScoredOnceSampler`) the row with no trained token if not scored."""
        r, scored = key if isinstance(key, tuple) else (key, True)
        cols = self.dataset[self.index[r]]
        labels = cols["labels"] if scored else [[IGNORE_INDEX] * len(ids) for ids in cols["input_ids"]]
        convs = [{"input_ids": i, "labels": lab} for i, lab in zip(cols["input_ids"], labels, strict=True)]
        if self.locations is not None:
            for conv, i in zip(convs, self.index[r], strict=True):
                conv["source"] = self.locations[i]
        return convs
