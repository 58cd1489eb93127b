"""Label-free warnings of a collapsing encoder, from the metrics of the logged steps (no torch).

A collapsed SimCLR encoder maps every view alike: all 2N - 1 candidates of an anchor score the
same, so the NT-Xent loss sits at ln(2N - 1) (N: pairs of the contrastive batch), and the effective
rank of the embeddings (RankMe, see `loss.contrastive_metrics`) falls towards 1. After warm-up,
`CollapseWatch` says so in one line when the loss stays within 1 % of ln(2N - 1) for 5 logged steps
in a row, or when the effective rank falls below 1 % of the embedding size; once per episode.
"""

from __future__ import annotations

import math
from typing import Any

LOSS_TOLERANCE = 0.01
"""Relative distance to ln(2N - 1) that counts as "no better than a collapsed encoder"."""
LOSS_PATIENCE = 5
"""Logged steps in a row near ln(2N - 1) before the warning."""
RANK_FRACTION = 0.01
"""Effective rank below this fraction of the embedding size is a warning."""


class CollapseWatch:
    """Feed every logged row (`step`, `loss`, `rankme`); `check` returns a warning line or None."""

    def __init__(self, warmup_steps: int, pairs: int, embedding_size: int) -> None:
        self.warmup_steps = warmup_steps
        self.chance_loss = math.log(2 * pairs - 1)
        self.min_rank = RANK_FRACTION * embedding_size
        self.embedding_size = embedding_size
        self._near_chance = 0
        self._warned: set[str] = set()

    def check(self, row: dict[str, Any]) -> str | None:
        if row.get("skipped") or row["step"] <= self.warmup_steps:
            return None
        near = abs(row["loss"] - self.chance_loss) <= LOSS_TOLERANCE * self.chance_loss
        self._near_chance = self._near_chance + 1 if near else 0
        low_rank = row.get("rankme", math.inf) < self.min_rank
        if self._near_chance >= LOSS_PATIENCE and "loss" not in self._warned:
            self._warned.add("loss")
            return (f"warning: step {row['step']}: the loss has stayed within {LOSS_TOLERANCE:.0%} of ln(2N-1) ="
                    f" {self.chance_loss:.3f} for {LOSS_PATIENCE} logged steps: the encoder may have collapsed (every"
                    " embedding alike); check the learning rate, temperature and views")
        if low_rank and "rank" not in self._warned:
            self._warned.add("rank")
            return (f"warning: step {row['step']}: the effective rank of the embeddings is {row['rankme']:.2f}, below"
                    f" {RANK_FRACTION:.0%} of their size {self.embedding_size}: the encoder may be collapsing")
        if not near:
            self._warned.discard("loss")
        if not low_rank:
            self._warned.discard("rank")
        return None
