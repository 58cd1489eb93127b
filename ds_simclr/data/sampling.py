"""Which sample each stream slot holds and which slots a rank's micro-batch takes (pure arithmetic).

Epoch e's stream is a concatenation of permutations of the dataset seeded by (seed, e, k), long
enough for steps_per_epoch x global_batch slots. Step s's global batch is the slots
[(s mod steps_per_epoch) x global_batch, ... + global_batch): micro-batch m covers
[... + m x micro x W, ... + (m + 1) x micro x W), and rank r takes the contiguous sub-slice
[r x micro, (r + 1) x micro). So 1 rank x 2n equals 2 ranks x n concatenated.

No volume twice in one global batch (a repeat is a false negative for NT-Xent): where a permutation
starts inside a batch, the volumes of its head that the batch already holds are swapped with
volumes from later in the same permutation. Each permutation stays a permutation, so every volume
is still seen once per pass. When the dataset is smaller than the batch, each batch holds every
volume and `repeated_pairs` = global_batch - N pairs repeat one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ds_simclr.data.params import derive_seed

_PERM_TAG = 0x5EED


@dataclass(frozen=True)
class Layout:
    """The batch arithmetic the loader needs; checked once."""

    global_batch: int
    micro_batch: int
    grad_accum: int
    world_size: int
    steps_per_epoch: int

    def __post_init__(self) -> None:
        if self.micro_batch * self.world_size * self.grad_accum != self.global_batch:
            raise ValueError(
                f"global_batch {self.global_batch} != micro_batch {self.micro_batch} x world_size "
                f"{self.world_size} x grad_accum {self.grad_accum}"
            )
        if self.steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1")

    def slots(self, step: int, micro: int, rank: int) -> list[int]:
        """Stream slots (within the step's epoch) of this rank's part of micro-batch `micro`."""
        base = (step % self.steps_per_epoch) * self.global_batch + micro * self.micro_batch * self.world_size
        first = base + rank * self.micro_batch
        return list(range(first, first + self.micro_batch))


def repeated_pairs(dataset_size: int, global_batch: int) -> int:
    """Pairs per global batch whose volume another pair of the batch also holds (0 when N >= batch)."""
    return max(0, global_batch - dataset_size)


def epoch_stream(dataset_size: int, slots: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """Dataset index of every slot of an epoch, (slots,) int64; O(slots + dataset_size)."""
    out = np.empty(slots, dtype=np.int64)
    pos = 0
    for k in range(math.ceil(slots / dataset_size)):
        g = torch.Generator().manual_seed(derive_seed(seed, epoch, k, _PERM_TAG))
        perm = torch.randperm(dataset_size, generator=g).numpy()
        offset = pos % global_batch
        if offset:  # starts inside a batch: keep its head clear of what the batch already holds
            _avoid(perm, min(global_batch - offset, dataset_size), out[pos - offset : pos])
        n = min(dataset_size, slots - pos)
        out[pos : pos + n] = perm[:n]
        pos += n
    return out


def _avoid(perm: np.ndarray, head: int, taken: np.ndarray) -> None:
    """Swap volumes of perm[:head] that are in `taken` with ones later in `perm` that are not (in place)."""
    clash = np.flatnonzero(np.isin(perm[:head], taken))
    if clash.size == 0:
        return
    free = head + np.flatnonzero(~np.isin(perm[head:], taken))
    n = min(clash.size, free.size)
    a, b = clash[:n], free[:n]
    perm[a], perm[b] = perm[b], perm[a].copy()


class EpochStream:
    """Dataset index of each slot of an epoch; keeps the current epoch's stream in memory."""

    def __init__(self, dataset_size: int, slots_per_epoch: int, global_batch: int, seed: int) -> None:
        if slots_per_epoch % global_batch:
            raise ValueError(f"slots_per_epoch {slots_per_epoch} is not a multiple of global_batch {global_batch}")
        self.size, self.slots, self.batch, self.seed = dataset_size, slots_per_epoch, global_batch, seed
        self._epoch = -1
        self._stream = np.empty(0, dtype=np.int64)

    def index(self, epoch: int, slot: int) -> int:
        if epoch != self._epoch:
            self._stream, self._epoch = epoch_stream(self.size, self.slots, self.batch, self.seed, epoch), epoch
        return int(self._stream[slot])
