"""NT-Xent on 2 real gloo ranks equals 1 process on the whole batch: loss and parameter gradients.

Each rank gets DIFFERENT data (its slice of one global batch). Gradients are averaged over ranks
as DeepSpeed does, then compared with one process on the concatenated batch. A second run swaps in
a detached gather (the baseline's mistake) to show the check fails when the gather is wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ds_simclr.loss as loss_module
from ds_simclr import dist as ds_dist
from ds_simclr.hostlist import free_port
from ds_simclr.loss import contrastive_metrics, nt_xent

pytestmark = pytest.mark.distributed

WORLD = 2
N_PER_RANK = 6
D_IN, D_OUT = 10, 16
TEMPERATURE = 0.5


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of WORLD * N_PER_RANK samples, views correlated like real positives."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(WORLD * N_PER_RANK, D_IN, generator=g)
    return x + 0.8 * torch.randn(x.shape, generator=g), x + 0.8 * torch.randn(x.shape, generator=g)


def _projection() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(D_IN, 32), nn.ReLU(), nn.Linear(32, D_OUT))


def _detached_gather(x: torch.Tensor) -> torch.Tensor:
    """The seed's gather: all_gather without autograd, local slice put back (gradients lost)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _step(x1: torch.Tensor, x2: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    """Loss and per-parameter gradients, averaged over ranks as DeepSpeed's data parallelism does."""
    model = _projection()
    loss = nt_xent(model(x1), model(x2), TEMPERATURE)
    loss.backward()
    grads = []
    for p in model.parameters():
        g = p.grad.detach().clone()
        if ds_dist.world_size() > 1:
            dist.all_reduce(g)
            g /= ds_dist.world_size()
        grads.append(g)
    return loss.item(), grads


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        v1, v2 = _global_batch()
        mine = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        loss, grads = _step(v1[mine], v2[mine])
        metrics = contrastive_metrics(v1[mine], v2[mine], TEMPERATURE)
        loss_module.gather_with_grad = _detached_gather
        bad_loss, bad_grads = _step(v1[mine], v2[mine])
        torch.save(
            {
                "rank": ds_dist.rank(),
                "world": ds_dist.world_size(),
                "loss": loss,
                "grads": grads,
                "metrics": metrics,
                "bad_loss": bad_loss,
                "bad_grads": bad_grads,
                "all_true": ds_dist.all_ranks_true(True),
                "all_true_mixed": ds_dist.all_ranks_true(rank == 0),
                "any_true_mixed": ds_dist.any_rank_true(rank == 0),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process() -> tuple[float, list[torch.Tensor]]:
    assert not dist.is_initialized()
    return _step(*_global_batch())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_ranks_see_a_real_process_group(two_rank_results: list[dict]) -> None:
    assert [r["rank"] for r in two_rank_results] == list(range(WORLD))
    assert all(r["world"] == WORLD for r in two_rank_results)


def test_loss_equals_single_process_on_every_rank(two_rank_results: list[dict], single_process) -> None:
    expected, _ = single_process
    losses = [r["loss"] for r in two_rank_results]
    assert losses[0] == losses[1], "every rank must report the same value"
    for loss in losses:
        assert loss == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_averaged_gradients_equal_single_process(two_rank_results: list[dict], single_process) -> None:
    _, expected = single_process
    for result in two_rank_results:
        for got, want in zip(result["grads"], expected):
            assert _rel_err(got, want) < 1e-5


def test_detached_gather_gives_wrong_gradients(two_rank_results: list[dict], single_process) -> None:
    expected_loss, expected = single_process
    bad = two_rank_results[0]
    assert bad["bad_loss"] == pytest.approx(expected_loss, rel=1e-6), "the forward value alone cannot catch it"
    worst = max(_rel_err(got, want) for got, want in zip(bad["bad_grads"], expected))
    assert worst > 1e-2, "the equivalence check must be able to fail"


def test_metrics_equal_single_process_on_every_rank(two_rank_results: list[dict]) -> None:
    expected = contrastive_metrics(*_global_batch(), TEMPERATURE)
    assert 0.0 < expected["positive_top1"] < 1.0, "test data should make some anchors miss"
    for result in two_rank_results:
        assert result["metrics"].keys() == expected.keys()
        for key, value in expected.items():
            assert result["metrics"][key] == pytest.approx(value, rel=1e-6), key


def test_flag_agreement(two_rank_results: list[dict]) -> None:
    for r in two_rank_results:
        assert r["all_true"] is True
        assert r["all_true_mixed"] is False
        assert r["any_true_mixed"] is True


def test_helpers_without_process_group() -> None:
    x = torch.randn(3, 4)
    assert ds_dist.rank() == 0 and ds_dist.world_size() == 1 and ds_dist.is_rank_zero()
    assert ds_dist.gather_with_grad(x) is x
    torch.testing.assert_close(ds_dist.all_reduce_sum(x), x)
    assert ds_dist.all_ranks_true(True) and not ds_dist.all_ranks_true(False)
    assert ds_dist.rank_zero_only(lambda: 5)() == 5
