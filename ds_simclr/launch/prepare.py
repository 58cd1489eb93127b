"""The run directory as `launch` writes it before starting anything."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ds_simclr.atomic import write_atomic
from ds_simclr.environment import software
from ds_simclr.errors import storage_error
from ds_simclr.hostlist import format_hostfile
from ds_simclr.launch.launchers import Launcher, LaunchPlan, hostfile_entries
from ds_simclr.rank_report import clear_reports


def environment_record(launcher: Launcher, plan: LaunchPlan, cmd: list[str]) -> dict:
    """environment.json as launch writes it (the engine adds what the ranks see)."""
    return {
        **software(),
        "launcher": launcher.name,
        "command": cmd,
        "cluster": plan.cluster.source,
        "slurm_job": plan.cluster.slurm_job,
        "hosts": list(plan.cluster.hosts),
        "procs_per_node": plan.cluster.procs_per_node,
        "world_size": plan.cluster.world_size,
        "launch_host": socket.gethostname(),
    }


def deepspeed_env_file(plan: LaunchPlan) -> Path:
    """The DeepSpeed launcher exports these lines on every host (DS_ENV_FILE)."""
    path = plan.run_dir / "deepspeed_env"
    safe = {k: v for k, v in plan.env.items() if not any(ch in v for ch in "\"$`\\\n")}
    write_atomic(path, "".join(f"{k}={v}\n" for k, v in sorted(safe.items())))
    return path


def prepare_run_dir(launcher: Launcher, plan: LaunchPlan, cmd: list[str], store: Path | None = None) -> None:
    """Check, then write spec.yaml, ds_config.json, hostfile and environment.json and forget the
    ranks' reports of an earlier job.

    Nothing is written before every check passed: a changed spec, checkpoints of which none is
    complete, another `store` (`runstart.check_run_dir`); the batch plan for this world size was
    made with the plan.
    """
    from ds_simclr.dsconfig import deepspeed_config
    from ds_simclr.rundir import RunPaths, write_run_files
    from ds_simclr.runstart import check_run_dir

    paths = RunPaths(plan.run_dir)
    check_run_dir(paths, plan.spec, store)
    with storage_errors("writing the run directory"):
        write_run_files(paths, plan.spec, deepspeed_config(plan.spec, plan.cluster.world_size))
        if launcher.uses_hostfile(plan):
            write_atomic(paths.hostfile, format_hostfile(hostfile_entries(plan)))
        write_atomic(paths.environment, json.dumps(environment_record(launcher, plan, cmd), indent=2) + "\n")
        clear_reports(paths.errors)


def newest_step(run_dir: Path) -> int | None:
    """Step of the newest complete checkpoint (None: none, or none complete)."""
    from ds_simclr.checkpoint import find_resume_point
    from ds_simclr.errors import CheckpointError
    from ds_simclr.rundir import RunPaths

    try:
        point = find_resume_point(RunPaths(run_dir).checkpoints, deep=False)
    except CheckpointError:
        return None
    return point.marker.step if point else None


@contextmanager
def storage_errors(doing: str) -> Iterator[None]:
    """Turn a full disk or an unwritable folder into its one-line StorageError."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, doing) or exc from None
