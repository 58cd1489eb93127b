"""Process-group start-up for every launcher: torchrun, the DeepSpeed launcher, mpirun, or none.

torchrun and the DeepSpeed launcher export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; mpirun exports its
own variables, which are mapped here (no mpi4py needed); a plain `python` start is a world of one.
On a CPU machine DeepSpeed's shared-memory comm op is switched off before init, so nothing is
JIT-compiled (training does not need it); on a GPU cuDNN's benchmark mode is switched on.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from ds_simclr.errors import LaunchError
from ds_simclr.hostlist import free_port

RENDEZVOUS_MINUTES = 30.0
"""How long starting ranks wait for each other, whatever `distributed.timeout_minutes` says."""

# (rank, world size, local rank, local world size) variables of the process managers we support:
# Open MPI, MPICH/Hydra, and srun (a job step's own variables, so a batch script is never taken for
# a rank of a bigger world).
_RANK_ENV = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
)


@dataclass(frozen=True)
class Placement:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def export_rank_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from a process manager, or for a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    for rank_var, size_var, local_var, local_size_var in _RANK_ENV:
        if rank_var in os.environ and size_var in os.environ:
            os.environ["RANK"] = os.environ[rank_var]
            os.environ["WORLD_SIZE"] = os.environ[size_var]
            os.environ["LOCAL_RANK"] = os.environ.get(local_var, "0")
            local_size = os.environ.get(local_size_var, "1").split("(")[0].split(",")[0]  # srun: "2(x2)"
            os.environ.setdefault("LOCAL_WORLD_SIZE", local_size)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(backend: str = "auto", timeout_minutes: float = 10.0) -> Placement:
    """Start the process group (idempotent) and pick this rank's device.

    Raises LaunchError (one line) for `nccl` on a rank without CUDA: torch would fail with a traceback."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    export_rank_env()
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # shapes repeat every step: cuDNN times its algorithms once
    else:
        device = torch.device("cpu")
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise LaunchError("nccl needs CUDA GPUs and this rank has none", where="distributed.backend", hint="use auto or gloo")
    if not torch.distributed.is_initialized():
        # Joining waits for the slowest rank to start (imports on a busy shared file system); only
        # the collectives after it are bounded by the spec's time-out.
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(minutes=max(timeout_minutes, RENDEZVOUS_MINUTES)),
        )
        torch.distributed.distributed_c10d._set_pg_timeout(datetime.timedelta(minutes=timeout_minutes))
    return Placement(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
    )
