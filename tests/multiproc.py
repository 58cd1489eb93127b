"""Run a function on W real ranks (spawned processes, gloo) and collect what each returns."""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp
from helpers import free_port


def _entry(local_rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        WANDB_SILENT="true",
    )
    try:
        results[local_rank] = ("ok", fn(*args))
    except BaseException:  # reported to the parent with its traceback
        results[local_rank] = ("error", traceback.format_exc())
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """`fn(*args)` on `world` ranks; returns the per-rank results (rank order)."""
    manager = mp.Manager()
    results = manager.dict()
    try:
        mp.spawn(_entry, args=(fn, world, free_port(), args, results), nprocs=world, join=True)
    except Exception as exc:
        errors = [v[1] for v in results.values() if v[0] == "error"]
        raise AssertionError("a rank failed:\n" + "\n".join(errors)) from exc
    return [results[r][1] for r in range(world)]
