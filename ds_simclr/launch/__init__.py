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
finished, so a batch script can requeue; also when the signal arrives before the launcher started.
A second signal terminates the launcher.

One job per run directory (`runlock`); the launcher and the ranks die with `launch` (`lifeline`);
a rank's user error ends the job with that rank's one line and exit status (`rank_report`).
"""

from __future__ import annotations

from pathlib import Path

from ds_simclr.errors import EXIT_STOPPED, DataError
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
    is_rank_cmdline,
    log,
    rank_pids,
    remote_signal_cmd,
    run_plan,
    signal_ranks,
    startup_signals_stop,
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
    "describe_data",
    "discover_cluster",
    "is_rank_cmdline",
    "launch",
    "make_plan",
    "prepare_data",
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
    """`ds_simclr launch`: check data, plan, and either print the plan or make the data ready and run it.

    Order: every check that needs no data (paths, the batch plan for this world size, the run
    directory: spec changes, complete checkpoints) before the data is made ready, so a refusal never
    waits for preprocessing; the store against the checkpoint's after it; writing last.
    """
    from ds_simclr.data.source import check_data_paths
    from ds_simclr.rundir import RunPaths
    from ds_simclr.runstart import check_run_dir

    with startup_signals_stop():
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
            echo(describe_data(spec, plan.cluster))
            return 0
        check_run_dir(RunPaths(plan.run_dir), spec)
        store = prepare_data(spec, plan.cluster)
        return run_plan(chosen, plan, store)


def describe_data(spec: RunSpec, cluster: Cluster) -> str:
    """The `--dry-run` line saying whether the store is ready or what `launch` would do first."""
    from ds_simclr.data.source import cores, preprocess_command, store_path
    from ds_simclr.data.store import read_head, store_ready

    store = store_path(spec.data)
    if store_ready(store):
        return f"data         store {store} (ready, {read_head(store)['images']} volumes)"
    if spec.data.demo:
        return f"data         demo store {store}: built first ({cores()} processes)"
    if cluster.nodes > 1:
        return (
            f"data         store {store} is not preprocessed: launch refuses on {cluster.nodes} nodes;"
            f" run `{preprocess_command(spec.data)}` first"
        )
    return f"data         {spec.data.manifest} -> store {store}: preprocessed first ({cores()} processes)"


def prepare_data(spec: RunSpec, cluster: Cluster, echo=log) -> Path:
    """Make the store (and the online probe's evaluation volume) complete before any rank starts
    (the collective time-out then bounds only collectives), and say when the dataset is smaller than
    the global batch; returns the store."""
    from ds_simclr.data.sampling import repeated_pairs
    from ds_simclr.data.source import cores, prepare_store
    from ds_simclr.data.store import PatchStore

    try:
        store = prepare_store(spec.data, jobs=cores(), nodes=cluster.nodes, echo=echo)
        volumes = len(PatchStore(store, spec.data.modalities))
    except DataError as exc:
        if exc.where and exc.where.startswith("data."):
            exc.where = spec.where(exc.where)
        raise
    batch = spec.train.global_batch
    repeats = repeated_pairs(volumes, batch)
    if repeats:
        echo(
            f"the store has {volumes} volumes, fewer than the global batch of {batch} pairs: {repeats} pairs"
            " of every step repeat a volume (false negatives for NT-Xent); more volumes or a smaller batch avoid it"
        )
    if spec.probes_online:  # the ranks only load it
        from ds_simclr.evaluation.atlas import ensure_eval_set

        ensure_eval_set(spec.data.cache_dir)
    return store
