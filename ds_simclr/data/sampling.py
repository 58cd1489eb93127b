"""Which sample each stream slot holds and which slots a rank's micro-batch takes (pure arithmetic).

Epoch e's stream is a concatenation of permutations of the dataset seeded by (seed, e, k), long
enough for steps_per_epoch x global_batch slots. Micro-batch m of step s covers the global slots
[(s mod steps_per_epoch) x global_batch + m x micro x W, ... + micro x W); rank r takes the
contiguous sub-slice [r x micro, (r + 1) x micro). So 1 rank x 2n equals 2 ranks x n concatenated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


class EpochStream:
    """Dataset index of each slot of an epoch; keeps the current epoch's stream in memory."""

    def __init__(self, dataset_size: int, slots_per_epoch: int, seed: int) -> None:
        self.size, self.slots, self.seed = dataset_size, slots_per_epoch, seed
        self._epoch = -1
        self._stream = torch.empty(0, dtype=torch.long)

    def index(self, epoch: int, slot: int) -> int:
        if epoch != self._epoch:
            parts = [
                torch.randperm(self.size, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, k, _PERM_TAG)))
                for k in range(math.ceil(self.slots / self.size))
            ]
            self._stream, self._epoch = torch.cat(parts), epoch
        return int(self._stream[slot])
