"""`ds_simclr launch` with real processes: the quickstart on 2 CPU ranks through each launcher,
a killed rank (the job ends quickly, the relaunch resumes), a preemption signal (checkpoint, exit 75,
the relaunch continues from it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CONFIGS, REPO

from ds_simclr.launch import EXIT_STOPPED, rank_pids
from ds_simclr.specload import load_spec

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
QUICKSTART = CONFIGS / "quickstart.yaml"


def launch_cmd(out: Path, cache: Path, launcher: str, *overrides: str) -> list[str]:
    sets = [f"output_dir={out}", f"data.cache_dir={cache}", "logging.wandb_mode=disabled", *overrides]
    return [sys.executable, "-m", "ds_simclr.cli", "launch", str(QUICKSTART), "--launcher", launcher,
            *[arg for s in sets for arg in ("--set", s)]]


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"{what} did not happen within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "mpirun"])
def test_quickstart_two_ranks(launcher: str, tmp_path: Path, demo_cache: Path) -> None:
    cmd = launch_cmd(tmp_path, demo_cache, launcher, "train.max_steps=3")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "quickstart"
    assert steps(run) == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_3"
    global_batch = load_spec(QUICKSTART).train.global_batch
    assert json.loads((run / "ds_config.json").read_text())["train_micro_batch_size_per_gpu"] == global_batch // 2
    env = json.loads((run / "environment.json").read_text())
    assert env["world_size"] == 2
    assert "launch: command: " in result.stderr and launcher.replace("torchrun", "ds_simclr.launch.torchrun") in result.stderr


@pytest.mark.parametrize("launcher", ["mpirun", "deepspeed"])
def test_dead_rank_ends_job_and_relaunch_resumes(launcher: str, tmp_path: Path, demo_cache: Path) -> None:
    cmd = launch_cmd(tmp_path, demo_cache, launcher, "train.max_steps=6", "checkpoint.every_steps=2")
    run, log = tmp_path / "quickstart", tmp_path / "first.log"
    proc = start(cmd, log)
    wait_for(lambda: (run / "checkpoints" / "latest").is_file(), 180, "the first checkpoint", proc, log)
    pids = rank_pids(run)
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    killed = time.monotonic()
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job did not end within 60 s of a rank dying")
    ended = time.monotonic() - killed
    text = log.read_text()
    assert rc != 0, text[-2000:]
    assert ended < 60
    assert "ended first" in text and str(pids[-1]) in text.split("ended first")[0].rsplit("launch:", 1)[1] and "run the same command to resume" in text, text[-2000:]
    before = (run / "checkpoints" / "latest").read_text().strip()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_from = int(before.split("_")[1])
    assert steps(run)[-(6 - resumed_from):] == list(range(resumed_from + 1, 7))


def test_preemption_signal_checkpoints_and_resume_continues(tmp_path: Path, demo_cache: Path) -> None:
    cmd = launch_cmd(tmp_path, demo_cache, "torchrun", "train.max_steps=40", "checkpoint.every_steps=100")
    run, log = tmp_path / "quickstart", tmp_path / "first.log"
    proc = start(cmd, log)
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(steps(run)) >= 2, 180, "step 2", proc, log)
    assert not (run / "checkpoints" / "latest").exists()
    proc.send_signal(signal.SIGUSR1)
    t0 = time.monotonic()
    rc = proc.wait(timeout=90)
    took = time.monotonic() - t0
    text = log.read_text()
    assert rc == EXIT_STOPPED, text[-3000:]
    assert took < 60
    tag = (run / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.split("_")[1])
    assert 2 <= stopped_at < 40 and "stopped on SIGUSR1" in text
    # the relaunch continues from the checkpoint (stop it early: the point is where it starts)
    relaunch = launch_cmd(tmp_path, demo_cache, "torchrun", f"train.max_steps={stopped_at + 2}",
                          "checkpoint.every_steps=100")
    result = subprocess.run(relaunch, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps(run)[-2:] == [stopped_at + 1, stopped_at + 2]
