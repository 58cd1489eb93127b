"""Distributed helpers that also work in one process (torch only).

Every function here is a no-op, or returns the single-process answer, when no process group is
initialised, so the loss and the engine need no `if distributed:` branches and unit tests run
without a launcher. Modelled on lightly's `utils/dist.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import torch
import torch.distributed as dist

P = ParamSpec("P")
R = TypeVar("R")


def is_distributed() -> bool:
    """True when a default process group exists (a launcher started us and init ran)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    """True on the rank that owns logging, files and progress bars."""
    return rank() == 0


def rank_zero_only(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Decorator: run `fn` on rank 0 only; other ranks get None."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        return fn(*args, **kwargs) if is_rank_zero() else None

    return wrapper


def comm_device() -> torch.device:
    """The device collectives need: the current CUDA device for NCCL, the CPU otherwise (gloo)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# torch 2.13 renamed the single-tensor collectives (the old names still work but warn); older torch
# (e.g. a GPU image's own) has only the old names. Same semantics: equal shapes on every rank,
# concatenated along dim 0.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward reduce-scatters: each rank gets the sum over ranks of its own rows.

    Forward: one `all_gather_into_tensor` into a preallocated (n * W, ...) tensor. Backward: one
    `reduce_scatter_tensor`, which moves half the bytes of an all-reduce of the whole (n * W, ...)
    gradient followed by slicing. Works on NCCL and gloo (torch 2.13's gloo has both collectives,
    tested on 2 and 3 ranks). Same semantics as `torch.distributed.nn.functional.all_gather`, which is deprecated.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))  # (n * W, ...)
        _all_gather_single(out, x)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()  # (n * W, ...), this rank's loss w.r.t. everyone's rows
        mine = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))  # (n, ...)
        _reduce_scatter_single(mine, grad, op=dist.ReduceOp.SUM)  # all ranks' losses w.r.t. my rows
        return mine


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` (n, ...) along dim 0 in rank order -> (n * world, ...).

    Differentiable: the backward pass sums the incoming gradients over ranks and hands each rank
    the slice of its own rows (one reduce-scatter), so gradients through other ranks' losses reach
    this rank's parameters. (A detached `dist.all_gather` with the local slice put back silently drops them.)
    All ranks must pass the same shape. Returns `x` itself without a process group.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())  # (n * world, ...)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a detached copy of `x` over ranks (for reporting; no gradient). `x` itself is untouched."""
    out = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_ranks_true(flag: bool) -> bool:
    """True only if `flag` is True on every rank, so all ranks take the same branch.

    Use it to agree on e.g. "this step's loss is finite" before skipping a step: ranks that
    disagree would run different collectives and hang until the timeout.
    """
    if world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def any_rank_true(flag: bool) -> bool:
    """True if `flag` is True on at least one rank (e.g. "stop requested")."""
    return not all_ranks_true(not flag)
