"""The run directory as `launch` writes it before starting anything."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from ds_simclr.environment import software
from ds_simclr.hostlist import format_hostfile
from ds_simclr.launch.launchers import Launcher, LaunchPlan, hostfile_entries


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
    from ds_simclr.rundir import write_atomic

    write_atomic(path, "".join(f"{k}={v}\n" for k, v in sorted(safe.items())))
    return path


def prepare_run_dir(launcher: Launcher, plan: LaunchPlan, cmd: list[str]) -> None:
    """Write spec.yaml, ds_config.json, hostfile and environment.json (refusing a changed spec)."""
    from ds_simclr.dsconfig import deepspeed_config
    from ds_simclr.rundir import (
        RunPaths,
        check_resumable,
        write_atomic,
        write_run_files,
    )

    paths = RunPaths(plan.run_dir)
    check_resumable(paths, plan.spec)
    write_run_files(paths, plan.spec, deepspeed_config(plan.spec, plan.cluster.world_size))
    if launcher.uses_hostfile(plan):
        write_atomic(paths.hostfile, format_hostfile(hostfile_entries(plan)))
    write_atomic(paths.environment, json.dumps(environment_record(launcher, plan, cmd), indent=2) + "\n")


def latest_step(run_dir: Path) -> int | None:
    from ds_simclr.rundir import TAG_PATTERN, RunPaths

    tag = RunPaths(run_dir).latest_tag()
    match = TAG_PATTERN.fullmatch(tag) if tag else None
    return int(match.group(1)) if match else None
