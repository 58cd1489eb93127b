"""Collapse warnings: the loss pinned at ln(2N-1) after warm-up, or the effective rank below 1 %."""

from __future__ import annotations

import math

from ds_simclr.health import CollapseWatch

CHANCE = math.log(2 * 16 - 1)


def _rows(losses: list[float], start: int = 1, rank: float = 20.0) -> list[dict]:
    return [{"step": start + i, "loss": loss, "rankme": rank, "skipped": False} for i, loss in enumerate(losses)]


def test_a_loss_stuck_at_chance_warns_once_after_five_logged_steps() -> None:
    watch = CollapseWatch(warmup_steps=10, pairs=16, embedding_size=64)
    warnings = [watch.check(r) for r in _rows([CHANCE] * 10 + [CHANCE * 1.005] * 7)]
    assert warnings[:14] == [None] * 14  # warm-up, then 4 stuck steps
    assert "ln(2N-1) = 3.434" in warnings[14] and "step 15" in warnings[14]
    assert warnings[15:] == [None, None]  # one line per episode


def test_progress_resets_the_count_and_a_new_episode_warns_again() -> None:
    watch = CollapseWatch(warmup_steps=0, pairs=16, embedding_size=64)
    losses = [CHANCE] * 4 + [2.0] + [CHANCE] * 4 + [2.0] + [CHANCE] * 5 + [2.0] + [CHANCE] * 5
    warnings = [watch.check(r) for r in _rows(losses)]
    fired = [i + 1 for i, w in enumerate(warnings) if w]
    assert fired == [15, 21]


def test_a_loss_outside_one_percent_never_warns() -> None:
    watch = CollapseWatch(warmup_steps=0, pairs=16, embedding_size=64)
    assert all(watch.check(r) is None for r in _rows([CHANCE * 0.985] * 20))


def test_a_rank_below_one_percent_of_the_embedding_warns() -> None:
    watch = CollapseWatch(warmup_steps=2, pairs=120, embedding_size=2048)
    assert watch.check(_rows([3.0], start=1, rank=5.0)[0]) is None  # still warming up
    line = watch.check(_rows([3.0], start=3, rank=5.0)[0])
    assert "effective rank of the embeddings is 5.00" in line and "2048" in line
    assert watch.check(_rows([3.0], start=4, rank=25.0)[0]) is None
