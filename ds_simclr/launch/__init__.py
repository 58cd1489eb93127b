"""`ds_simclr launch`: discover the cluster, write the run directory, start the launcher.

Discovery, in order: a hostfile (`--hostfile`, then `distributed.hostfile`), a SLURM allocation
(`SLURM_JOB_NODELIST`), else this machine. Ranks per node: the spec's `distributed.procs_per_node`
when it is a number, else GPUs per node (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, the hostfile's
slots, visible GPUs), else 2 on a CPU machine. The world size fixes the batch split (`plan_batch`).

Launch commands are data: one small class per launcher builds the argv (`build_cmd`); `run_plan`
logs it, starts it and passes its exit status through. Every rank runs
`python -m ds_simclr.cli train <run>/spec.yaml --run-dir <run>`, so all ranks read the one resolved
spec the launch wrote.

Stopping: SIGTERM, SIGUSR1 or SIGINT to `launch` is forwarded to the ranks themselves (local ones
found under the launcher's process tree, remote ones through `srun --overlap` or pdsh), which agree
on a step, checkpoint and exit 0; `launch` then exits with EXIT_STOPPED (75) when the run is not
finished, so a batch script can requeue. A second signal terminates the launcher.
"""

from __future__ import annotations

from pathlib import Path

from ds_simclr.errors import DataError
from ds_simclr.launch.cluster import Cluster, discover_cluster, slurm_hostfile
from ds_simclr.launch.launchers import (
    LAUNCHERS,
    DeepSpeedLauncher,
    Launcher,
    LaunchPlan,
    MpirunLauncher,
    TorchrunLauncher,
    describe,
    make_plan,
)
from ds_simclr.launch.prepare import prepare_run_dir
from ds_simclr.launch.supervise import (
    EXIT_STOPPED,
    is_rank_cmdline,
    rank_pids,
    remote_signal_cmd,
    run_plan,
    signal_ranks,
)
from ds_simclr.spec import RunSpec

__all__ = [
    "EXIT_STOPPED",
    "LAUNCHERS",
    "Cluster",
    "DeepSpeedLauncher",
    "LaunchPlan",
    "Launcher",
    "MpirunLauncher",
    "TorchrunLauncher",
    "describe",
    "discover_cluster",
    "is_rank_cmdline",
    "launch",
    "make_plan",
    "prepare_run_dir",
    "rank_pids",
    "remote_signal_cmd",
    "run_plan",
    "signal_ranks",
    "slurm_hostfile",
]


def launch(
    spec: RunSpec,
    launcher: str | None = None,
    hostfile: Path | None = None,
    dry_run: bool = False,
    echo=print,
) -> int:
    """`ds_simclr launch`: check data, plan, and either print the plan or run it."""
    from ds_simclr.data.source import check_data_paths

    try:
        check_data_paths(spec.data)
    except DataError as exc:
        exc.where = spec.where(exc.where or "data")
        raise
    if spec.model.init_from is not None and not Path(spec.model.init_from).is_file():
        raise DataError("file not found", where=f"{spec.where('model.init_from')}: {spec.model.init_from}")
    chosen, plan = make_plan(spec, launcher, hostfile)
    if dry_run:
        echo(describe(chosen, plan))
        return 0
    if spec.probes_online:  # the online probe's volume, ready before the ranks start (they only load it)
        from ds_simclr.evaluation.atlas import ensure_eval_set

        ensure_eval_set(spec.data.cache_dir)
    return run_plan(chosen, plan)
