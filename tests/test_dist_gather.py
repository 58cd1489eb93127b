"""The differentiable gather on 3 real gloo ranks: values, gradients and the collectives used.

Each rank r holds different rows x_r and weighs the gathered (n * W, D) tensor with its own weights
w_r, loss_r = sum(w_r * gather(x)). The gradient of sum_q loss_q with respect to x_r is the sum over
q of w_q's rows that belong to r: what the reduce-scatter backward must hand to rank r. Both the
torch 2.13 names (`all_gather_single`, `reduce_scatter_single`) and the older ones a GPU image's
torch may have (`all_gather_into_tensor`, `reduce_scatter_tensor`) are run, in one job (starting
ranks is what costs time). The 2-rank NT-Xent equivalence (test_loss_distributed.py) runs the same
gather.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

from ds_simclr import dist as ds_dist

pytestmark = pytest.mark.distributed

N, D = 3, 5


def _rows(rank: int) -> torch.Tensor:
    return torch.arange(N * D, dtype=torch.float32).reshape(N, D) + 100.0 * rank


def _weights(rank: int, world: int) -> torch.Tensor:
    return torch.randn(N * world, D, generator=torch.Generator().manual_seed(rank))


def _gather(old_names: bool) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    names = (
        (dist.all_gather_into_tensor, dist.reduce_scatter_tensor)
        if old_names  # what a torch without the 2.13 names runs
        else (dist.all_gather_single, dist.reduce_scatter_single)
    )
    calls: list[str] = []

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapper

    ds_dist._all_gather_single, ds_dist._reduce_scatter_single = (counted(fn) for fn in names)
    x = _rows(rank).requires_grad_()
    gathered = ds_dist.gather_with_grad(x)
    (gathered * _weights(rank, world)).sum().backward()
    return {"gathered": gathered.detach(), "grad": x.grad, "calls": calls}


def _gather_worker() -> dict[bool, dict]:
    dist.init_process_group("gloo")
    return {old_names: _gather(old_names) for old_names in (False, True)}


WORLD = 3


def test_gather_forward_and_reduce_scatter_backward() -> None:
    results = run_ranks(_gather_worker, WORLD)
    everyone = torch.cat([_rows(r) for r in range(WORLD)])  # (N * W, D)
    weight_sum = sum(_weights(q, WORLD) for q in range(WORLD))  # d(sum_q loss_q) / d(gathered)
    for old_names, expected_calls in (
        (False, ["all_gather_single", "reduce_scatter_single"]),
        (True, ["all_gather_into_tensor", "reduce_scatter_tensor"]),
    ):
        for rank, by_names in enumerate(results):
            result = by_names[old_names]
            torch.testing.assert_close(result["gathered"], everyone, rtol=0, atol=0)
            torch.testing.assert_close(result["grad"], weight_sum[rank * N : (rank + 1) * N])
            assert result["calls"] == expected_calls, "one gather forward, one reduce-scatter backward"
