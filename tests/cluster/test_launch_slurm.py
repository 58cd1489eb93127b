"""The sbatch templates on a real SLURM (2 simulated hosts): one-node CPU smoke job, a 2-host
DeepSpeed-launcher job whose hostfile `ds_simclr launch` writes from the allocation, node-list
expansion against `scontrol show hostnames`, and preemption (USR1 -> checkpoint -> requeue -> resume)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
VENV = Path(sys.executable).parent.parent


def job_env(tmp_path: Path) -> dict:
    return {
        "DS_SIMCLR_VENV": str(VENV),
        "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}",
        "DS_ACCELERATOR": "cpu",
        "WANDB_MODE": "disabled",
        "TMPDIR": str(tmp_path),
    }


def sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def metrics_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_hostnames_match_scontrol(slurm_cluster, tmp_path: Path) -> None:
    script = tmp_path / "hosts.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"scontrol show hostnames \"$SLURM_JOB_NODELIST\" > {tmp_path}/scontrol.txt\n"
        f"ds_simclr hostfile -o {tmp_path}/hostfile\n"
    )
    job = slurm_cluster.sbatch("-N", "2", "--gpus-per-node=2", "-o", str(tmp_path / "out.txt"), str(script),
                               cwd=tmp_path, env=job_env(tmp_path))
    assert slurm_cluster.wait(job, 60) == ("COMPLETED", "0:0"), (tmp_path / "out.txt").read_text()
    names = (tmp_path / "scontrol.txt").read_text().split()
    assert names == ["h1", "h2"]
    assert (tmp_path / "hostfile").read_text() == "".join(f"{n} slots=2\n" for n in names)


def test_cpu_smoke_template_one_node(slurm_cluster, tmp_path: Path, demo_cache: Path) -> None:
    out = tmp_path / "job.out"
    args = sets(f"output_dir={tmp_path}", f"data.cache_dir={demo_cache}", "train.max_steps=3")
    job = slurm_cluster.sbatch("-o", str(out), "slurm/cpu_smoke.sbatch", "ds_configs/quickstart.yaml", *args,
                               cwd=REPO, env=job_env(tmp_path))
    state = slurm_cluster.wait(job, 240)
    assert state == ("COMPLETED", "0:0"), out.read_text()[-3000:]
    run = tmp_path / "quickstart"
    assert metrics_steps(run) == [1, 2, 3]
    env = json.loads((run / "environment.json").read_text())
    assert env["world_size"] == 2 and env["hosts"] == ["h1"]


@pytest.mark.parametrize("backend", ["pdsh", "slurm"])
def test_deepspeed_template_two_hosts(slurm_cluster, tmp_path: Path, demo_cache: Path, backend: str) -> None:
    out = tmp_path / "job.out"
    args = sets(f"output_dir={tmp_path}", f"data.cache_dir={demo_cache}", "train.max_steps=3",
                "distributed.nodes=auto", "distributed.procs_per_node=1", f"distributed.deepspeed_backend={backend}")
    job = slurm_cluster.sbatch("-N", "2", "--gpus-per-node=2", "--cpus-per-task=1", "--exclusive", "-o", str(out),
                               "slurm/deepspeed_3x4.sbatch", "ds_configs/quickstart.yaml", *args,
                               cwd=REPO, env=job_env(tmp_path))
    state = slurm_cluster.wait(job, 300)
    text = out.read_text()
    assert state == ("COMPLETED", "0:0"), text[-4000:]
    run = tmp_path / "quickstart"
    assert (run / "hostfile").read_text() == "h1 slots=1\nh2 slots=1\n"
    assert f"--launcher={backend}" in text
    env = json.loads((run / "environment.json").read_text())
    assert env["rank_hosts"] == ["h1", "h2"], env
    assert metrics_steps(run) == [1, 2, 3]


def test_preemption_requeues_and_resumes(slurm_cluster, tmp_path: Path, demo_cache: Path) -> None:
    out = tmp_path / "job.out"
    args = sets(f"output_dir={tmp_path}", f"data.cache_dir={demo_cache}", "train.max_steps=12",
                "checkpoint.every_steps=100")
    job = slurm_cluster.sbatch("-o", str(out), "slurm/cpu_smoke.sbatch", "ds_configs/quickstart.yaml", *args,
                               cwd=REPO, env=job_env(tmp_path))
    run = tmp_path / "quickstart"
    deadline = time.monotonic() + 180
    while not ((run / "metrics.jsonl").is_file() and len(metrics_steps(run)) >= 2):
        assert time.monotonic() < deadline, out.read_text()[-3000:] if out.exists() else "no output"
        time.sleep(0.3)
    # what `#SBATCH --signal=B:USR1@60` does ahead of the time limit
    import subprocess

    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, env=slurm_cluster.env, timeout=30)
    deadline = time.monotonic() + 240
    while "requeueing job" not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, out.read_text()[-3000:]
        time.sleep(0.3)
    stopped = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= stopped < 12
    # the requeued job starts again and resumes from the checkpoint; SLURM delays a requeued job's
    # start by ~2 minutes, so let it begin soon once it is pending again (not within the same
    # second: slurmd refuses that start, "Job credential revoked", as the old instance's credential
    # was revoked at a one-second granularity)
    deadline = time.monotonic() + 60
    while slurm_cluster.job_state(job)[0] != "PENDING":
        assert time.monotonic() < deadline, slurm_cluster.job_state(job)
        time.sleep(0.3)
    for cmd in (["release", job], ["update", f"jobid={job}", "StartTime=now+3"]):
        subprocess.run(["scontrol", *cmd], env=slurm_cluster.env, timeout=30, capture_output=True)
    state = slurm_cluster.wait(job, 300)
    text = out.read_text()
    assert state == ("COMPLETED", "0:0"), text[-4000:]
    steps = metrics_steps(run)
    assert steps[-1] == 12 and (run / "checkpoints" / "latest").read_text().strip() == "step_12"
    assert f"step {stopped + 1}/12" in text and text.count("ds_simclr launch ds_configs") == 2
