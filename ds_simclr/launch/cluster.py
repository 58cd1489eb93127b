"""Where a job runs: a hostfile, a SLURM allocation, or this machine, and ranks per node."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ds_simclr.errors import LaunchError
from ds_simclr.hostlist import HostSlots, expand_nodelist, read_hostfile
from ds_simclr.spec import RunSpec

CPU_DEFAULT_PROCS = 2
"""Ranks per node on a machine without GPUs when the spec says `auto`."""


@dataclass(frozen=True)
class Cluster:
    """The hosts a job runs on, ranks per host, and where that came from."""

    hosts: tuple[str, ...]
    procs_per_node: int
    source: str
    """`local`, `hostfile <path>` or `SLURM job <id>`."""
    cores_per_node: int
    gpus_per_node: int = 0
    slurm_job: str | None = None

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def is_local(self) -> bool:
        return self.nodes == 1 and _is_this_host(self.hosts[0])

    @property
    def master_addr(self) -> str:
        return "127.0.0.1" if self.is_local else self.hosts[0]


def _is_this_host(host: str) -> bool:
    names = {"localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0]}
    return host in names


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    """An integer from `env[name]`; `gpu:4`, `h100:4` and `4(x2)` forms give 4."""
    value = env.get(name, "").strip()
    if not value:
        return None
    text = value.split("(")[0].split(",")[0].split(":")[-1]
    if not text.isdigit() or int(text) < 1:
        raise LaunchError(f"cannot read a count from {value!r}", where=name)
    return int(text)


def visible_gpus(env: Mapping[str, str]) -> int:
    """GPUs this process could use, without importing torch."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() not in ("", "-1")])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def _cores(env: Mapping[str, str]) -> int:
    return _int_env(env, "SLURM_CPUS_ON_NODE") or len(os.sched_getaffinity(0))


def discover_cluster(spec: RunSpec, env: Mapping[str, str] | None = None, hostfile: Path | None = None) -> Cluster:
    """Hosts and ranks per host: hostfile > SLURM allocation > this machine."""
    env = os.environ if env is None else env
    dist = spec.distributed
    hostfile = hostfile or dist.hostfile
    cores = _cores(env)
    gpus_per_node = 0
    slurm_job = env.get("SLURM_JOB_ID")
    if hostfile is not None:
        entries = read_hostfile(Path(hostfile))
        slots = {entry.slots for entry in entries}
        if len(slots) > 1 and dist.procs_per_node == "auto":
            raise LaunchError(
                "hosts have different slot counts",
                where=str(hostfile),
                hint="give every host the same slots, or set distributed.procs_per_node",
            )
        hosts = [entry.host for entry in entries]
        discovered = min(slots)
        source = f"hostfile {hostfile}"
        gpus_per_node = visible_gpus(env)
    elif env.get("SLURM_JOB_NODELIST"):
        hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
        nnodes = _int_env(env, "SLURM_NNODES") or len(hosts)
        if nnodes != len(hosts):
            raise LaunchError(
                f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST names {len(hosts)} hosts", where="SLURM_NNODES"
            )
        gpus_per_node = _int_env(env, "SLURM_GPUS_ON_NODE") or _int_env(env, "SLURM_GPUS_PER_NODE") or 0
        discovered = gpus_per_node or CPU_DEFAULT_PROCS
        source = f"SLURM job {slurm_job or '?'}"
    else:
        hosts = [socket.gethostname()]
        gpus_per_node = visible_gpus(env)
        discovered = gpus_per_node or CPU_DEFAULT_PROCS
        source = "local"
        slurm_job = None
    if dist.nodes != "auto":
        if dist.nodes > len(hosts):
            raise LaunchError(
                f"the spec asks for {dist.nodes} nodes but {source} has {len(hosts)}",
                where=spec.where("distributed.nodes"),
                hint="set distributed.nodes=auto, or get a larger allocation/hostfile",
            )
        hosts = hosts[: dist.nodes]
    procs = dist.procs_per_node if dist.procs_per_node != "auto" else discovered
    if hostfile is not None and procs > min(entry.slots for entry in entries[: len(hosts)]):
        raise LaunchError(
            f"distributed.procs_per_node={procs} exceeds the hostfile's slots",
            where=spec.where("distributed.procs_per_node"),
        )
    return Cluster(
        hosts=tuple(hosts),
        procs_per_node=procs,
        source=source,
        cores_per_node=cores,
        gpus_per_node=gpus_per_node,
        slurm_job=slurm_job,
    )


def slurm_hostfile(env: Mapping[str, str] | None = None, slots: int | None = None) -> list[HostSlots]:
    """`host slots=N` entries for the current SLURM allocation (N: GPUs per node, else 1)."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_NODELIST"):
        raise LaunchError(
            "no SLURM allocation (SLURM_JOB_NODELIST is not set)",
            where="hostfile",
            hint="run inside sbatch/salloc, or write the hostfile by hand (see hostfiles/)",
        )
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    if slots is None:
        slots = (
            _int_env(env, "SLURM_GPUS_ON_NODE")
            or _int_env(env, "SLURM_GPUS_PER_NODE")
            or _int_env(env, "SLURM_NTASKS_PER_NODE")
            or 1
        )
    return [HostSlots(host, slots) for host in hosts]
