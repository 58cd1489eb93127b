"""Gradient cache: the exact NT-Xent loss and gradient of a whole optimizer step, one micro-batch's activations.

Gao, Zhang, Han & Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
RepL4NLP 2021, https://arxiv.org/abs/2101.06983.

Per optimizer step, with K micro-batches of n pairs on each of W ranks (N = n K W pairs):

1. Every micro-batch is forwarded without an autograd graph. Kept: its embeddings (2n, D) and the
   RNG state its forward started from; not its views (2n, C, S, S, S), which at 160^3 would grow with
   the global batch: the loader makes them again, bit-identically, for the second forward.
2. This rank's embeddings are concatenated view by view (z1, z2: (nK, D) fp32 leaves) and
   `ds_simclr.loss.nt_xent` runs once over all N pairs of all ranks; its gather sums gradient
   contributions over ranks, so backward gives g = dL_r/dz for this rank's embeddings, where L_r is
   the rank's gradient-carrying term (its cross-entropy sum / 2nK): exactly what the plain path
   backpropagates for one micro-batch of nK pairs.
3. The loss is the global mean, the same number on every rank (`nt_xent` all-reduces it), so its
   finiteness is agreed without another collective: one host sync per optimizer step. A non-finite
   loss ends the step before anything reaches DeepSpeed.
4. Every micro-batch is forwarded again with a graph, from the same views and the same RNG state,
   and `engine.backward(sum(z * g_k), scale_wrt_gas=False)` backpropagates its slice g_k of the
   cached gradient: the surrogate's gradient with respect to z is g_k itself, and DeepSpeed must not
   divide it by the accumulation steps (g already is the whole step's gradient). `engine.step()` after
   every micro-batch puts DeepSpeed's accumulation boundary (gradient reduction, clipping, the
   optimizer step) on the last one. Summed over micro-batches, sum_k (dz_k/dtheta)^T g_k = dL_r/dtheta.

Parameters do not change between the two forwards (the optimizer steps at the boundary only); a
module with running statistics (BatchNorm) would update them twice, ResEnc has none.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ds_simclr.loss import nt_xent


@dataclass
class CachedStep:
    """What one gradient-cache optimizer step did."""

    loss: float
    """NT-Xent over all pairs of the step (the global mean, equal on every rank); NaN/inf if non-finite."""
    z1: torch.Tensor
    """(nK, D) fp32, this rank's first-view embeddings of the whole step (detached; for metrics)."""
    z2: torch.Tensor
    """(nK, D) fp32, the second views'."""
    stepped: bool
    """The micro-batches went through DeepSpeed up to its accumulation boundary (False: skipped before)."""
    optimizer_s: float
    """Seconds in `engine.step()` (the boundary's reduction, clipping and update)."""

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss)


class _RngState:
    """The CPU generator and, for CUDA inputs, that device's generator, to replay a forward's draws."""

    def __init__(self, device: torch.device) -> None:
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the generators' current states are put back afterwards."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def gradient_cache_step(
    engine: Any,
    micro_views: Iterable[torch.Tensor],
    views_again: Callable[[int], torch.Tensor],
    temperature: float,
) -> CachedStep:
    """Run one optimizer step over K micro-batches with the gradient cache (see the module docstring).

    engine: a DeepSpeed engine whose `gradient_accumulation_steps()` is K. micro_views: the K
    micro-batches' views (2n, C, S, S, S) in the module's dtype, the first n rows the first views of n
    samples, the others their second views; n equal on every rank. views_again(k): micro-batch k's
    views once more, bit-identical (for the second forward). Every rank calls this for the same step.
    """
    states: list[_RngState] = []
    z1_parts, z2_parts = [], []
    with torch.no_grad():
        for views in micro_views:
            states.append(_RngState(views.device))  # the RNG state its forward starts from
            first, second = engine(views).chunk(2)  # (n, D) each
            z1_parts.append(first)
            z2_parts.append(second)
    z1 = torch.cat(z1_parts).float().requires_grad_()  # (nK, D) fp32 leaf
    z2 = torch.cat(z2_parts).float().requires_grad_()  # (nK, D) fp32 leaf
    sizes = [part.shape[0] for part in z1_parts]  # n per micro-batch
    del z1_parts, z2_parts
    loss = nt_xent(z1, z2, temperature)  # () global mean over all 2N anchors
    result = CachedStep(float(loss.detach()), z1.detach(), z2.detach(), stepped=False, optimizer_s=0.0)
    if not result.finite:  # the step's one host sync, the same verdict on every rank
        return result  # no rank backpropagates (the gather's backward is a collective)
    loss.backward()
    start = 0
    for k, (state, n) in enumerate(zip(states, sizes)):
        g = torch.cat([z1.grad[start : start + n], z2.grad[start : start + n]])  # (2n, D) fp32, dL_r/dz_k
        start += n
        views = views_again(k)  # (2n, C, S, S, S), the first pass's inputs
        with state.replay():
            z = engine(views)  # (2n, D), the first pass's embeddings, now with a graph
        engine.backward((z.float() * g).sum(), scale_wrt_gas=False)  # d/dz = g_k
        t0 = time.perf_counter()
        engine.step()  # the boundary (reduce, clip, update) at the last micro-batch
        result.optimizer_s += time.perf_counter() - t0
    result.stepped = True
    return result
