"""Faults while a real 2-rank job runs through `ds_simclr launch`, and what `launch` says about them.

- The fault campaign (`benchmarks/faults.py`, 8 of its trials): after a SIGKILLed rank (also while a
  checkpoint is written), a killed launcher, SIGTERM/SIGUSR1, a deleted, truncated or garbled newest
  checkpoint, garbage in `latest` or a torn metrics line, the same command finishes the run, resumed
  from the newest complete checkpoint, one metrics row per step, losses equal to the uninterrupted
  run's bit for bit.
- A full disk while a checkpoint is written (a small tmpfs): one line, exit 74, the previous
  checkpoint loadable; with space again the same command finishes the run.
- Errors only a rank sees end the job with that rank's one line and exit status, no traceback, and
  no advice to run the same command again; a read-only or full run directory, an impossible world
  size on resume and a signal during start-up each give one line and their status, nothing
  overwritten.
- A resumed job continues the same offline W&B run, recorded as resumed, no step logged twice.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO

from ds_simclr.checkpoint import find_resume_point
from ds_simclr.data.demo import demo_store_path
from ds_simclr.data.store import read_index, write_index
from ds_simclr.errors import EXIT_CANTCREAT, EXIT_IOERR, EXIT_NONFINITE, EXIT_STOPPED

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _load_campaign_module():
    spec = importlib.util.spec_from_file_location("faults_benchmark", REPO / "benchmarks" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["faults_benchmark"] = module
    spec.loader.exec_module(module)
    return module


faults = _load_campaign_module()

CI_TRIALS = (
    "kill_rank_in_checkpoint", "kill_launcher", "sigterm", "sigusr1",
    "delete_newest", "truncate_newest", "garbage_latest", "torn_metrics",
)
"""8 trials (sigusr1 first among those that need a stopped run: it provides it). The full campaign
(`python benchmarks/faults.py`, 33 trials) adds SIGKILL at random steps and garbage inside a
checkpoint file, which `test_launch_runs` (a dead rank) and `test_checkpoint` (zip CRCs) also cover."""


def test_fault_campaign(tmp_path: Path, demo_cache: Path) -> None:
    campaign = faults.Campaign(tmp_path, demo_cache, steps=8, every=2, rng=random.Random(10))
    campaign.run_baseline()
    trials = []
    for kind in CI_TRIALS:
        trial = campaign.trial(kind)
        trials.append(trial)
        print(f"{trial.kind:<24} {'survived' if trial.survived else 'LOST':<9} {trial.detail}")
    print(faults.summary(trials))
    counted = [t for t in trials if t.kind != "none"]
    assert len(counted) == len(CI_TRIALS), "every fault must land while the run is unfinished"
    assert all(t.survived for t in counted), "\n".join(f"{t.kind}: {t.detail}" for t in counted if not t.survived)


# ------------------------------------------------------------------ helpers


def launch_cmd(out: Path, cache: Path, *overrides: str) -> list[str]:
    """The quickstart launch with one `--set` per field (`overrides` replace these defaults)."""
    sets = [f"output_dir={out}", f"data.cache_dir={cache}", "logging.wandb_mode=disabled", "logging.image_every=0",
            "distributed.launcher=torchrun", *overrides]
    by_field = {s.partition("=")[0]: s for s in sets}
    return [sys.executable, "-m", "ds_simclr.cli", "launch", str(REPO / "ds_configs" / "quickstart.yaml"),
            *[arg for s in by_field.values() for arg in ("--set", s)]]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs (root and a kernel that allows mounting, else skipped)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): full-disk faults not tested")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# ------------------------------------------------------------------ disk full, read-only


def test_full_disk_during_a_checkpoint(tmpfs: Path, demo_cache: Path) -> None:
    """9 MiB hold two checkpoints of the quickstart (~3.5 MiB each) but not a third beside them."""
    cmd = launch_cmd(tmpfs, demo_cache, "train.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=2")
    result = run(cmd)
    assert result.returncode == EXIT_IOERR, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "no space left on device while writing checkpoint step_" in errors[0], result.stderr[-3000:]
    assert "is the newest complete checkpoint" in errors[0] and "Traceback" not in result.stderr
    point = find_resume_point(tmpfs / "quickstart" / "checkpoints", deep=True)  # every file, every CRC
    assert point is not None and point.tag in errors[0]

    subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmpfs / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_a_full_or_read_only_run_directory_at_start_is_one_line(tmpfs: Path, demo_cache: Path) -> None:
    (tmpfs / "filler").write_bytes(b"\0" * (9 * 2**20 - 4096))
    full = run(launch_cmd(tmpfs, demo_cache, "train.max_steps=2"), timeout=120)
    assert full.returncode == EXIT_IOERR, full.stderr[-2000:]
    assert len(error_lines(full.stderr)) == 1 and "no space left on device" in full.stderr
    (tmpfs / "filler").unlink()
    shutil.rmtree(tmpfs / "quickstart", ignore_errors=True)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    read_only = run(launch_cmd(tmpfs, demo_cache, "train.max_steps=2"), timeout=120)
    assert read_only.returncode == EXIT_CANTCREAT, read_only.stderr[-2000:]
    assert len(error_lines(read_only.stderr)) == 1 and "read-only file system" in read_only.stderr
    assert "Traceback" not in full.stderr + read_only.stderr


# ------------------------------------------------------------------ errors a rank finds


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("distributed.backend=nccl", "nccl needs CUDA GPUs and this rank has none"),  # found by every rank
        ("data.modalities=[FLAIR]", "no images of modalities ['FLAIR']"),  # found by launch, which makes the data ready
    ],
)
def test_a_user_error_found_on_the_ranks_is_the_jobs_one_line(
    tmp_path: Path, demo_cache: Path, setting: str, message: str
) -> None:
    result = run(launch_cmd(tmp_path, demo_cache, "train.max_steps=2", setting))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "run the same command" not in result.stderr


def test_too_many_nonfinite_steps_have_their_own_status(tmp_path: Path, demo_cache: Path) -> None:
    """A store whose volumes hold inf (whatever its layout: every `.npy` volume) makes every loss NaN."""
    import numpy as np

    store = tmp_path / "store"
    shutil.copytree(demo_store_path(demo_cache), store)
    for volume in store.rglob("*.npy"):
        data = np.load(volume, mmap_mode="r+")
        data[...] = np.inf
        data.flush()
    cmd = launch_cmd(tmp_path, demo_cache, "train.max_steps=30", "train.max_nonfinite_steps=2", "data.demo=false",
                     f"data.store={store}")
    result = run(cmd)
    assert result.returncode == EXIT_NONFINITE, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "2 steps in a row had a non-finite loss; stopped at step 2" in errors[0]
    assert "Traceback" not in result.stderr and "run the same command" not in result.stderr
    assert (tmp_path / "quickstart" / "checkpoints" / "latest").read_text() == "step_2"


def test_refused_resumes_overwrite_nothing(tmp_path: Path, demo_cache: Path) -> None:
    """A world size that cannot split the batch, and another store at the same path (its identity
    differs from the checkpoint's): one line, exit 2, nothing in the run directory rewritten."""
    store = tmp_path / "store"
    shutil.copytree(demo_store_path(demo_cache), store)
    cmd = [*launch_cmd(tmp_path, demo_cache, "data.demo=false", f"data.store={store}"), "--set"]
    assert run([*cmd, "train.max_steps=3"]).returncode == 0
    run_dir = tmp_path / "quickstart"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}

    result = run([*cmd, "train.max_steps=4", "--set", "distributed.procs_per_node=3"])
    assert result.returncode == 2, result.stderr[-2000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "cannot be split over 3 ranks" in errors[0]
    assert "world sizes that work: 1, 2, 4, 8, 16" in errors[0]

    head, (ids, shapes, pad_values, codes) = read_index(store)  # same path, another store: one image fewer
    write_index(store, [i.decode() for i in ids[1:]], shapes[1:], pad_values[1:], [head["modalities"][c] for c in codes[1:]])
    result = run([*cmd, "train.max_steps=4"])
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "step_3 was trained on a store with identity" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "run the same command" not in result.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_signal_during_start_up_exits_75(tmp_path: Path, demo_cache: Path) -> None:
    log = tmp_path / "launch.log"
    proc = subprocess.Popen(launch_cmd(tmp_path, demo_cache, "train.max_steps=50"), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, cwd=REPO)
    environment = tmp_path / "quickstart" / "environment.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if environment.is_file() and "rank_hosts" in environment.read_text():
            break  # rank 0 has prepared the run directory; the ranks start DeepSpeed next
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == EXIT_STOPPED, text[-3000:]
    assert "stopped on SIGTERM" in text and "run the same command to resume" in text and "Traceback" not in text
    assert "step 1/" not in text  # stopped before the first step


def _processes_naming(run_dir: Path) -> list[int]:
    """Processes whose command line names the run directory (launchers, per-node agents, ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(run_dir).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_killing_launch_ends_the_deepspeed_launchers_ranks(tmp_path: Path, demo_cache: Path) -> None:
    """The DeepSpeed launcher runs a per-node `launch.py` between itself and the ranks: the ranks'
    watch on `launch` ends them when `kill -9` takes `launch` (the torchrun case: the campaign)."""
    cmd = launch_cmd(tmp_path, demo_cache, "train.max_steps=500", "distributed.launcher=deepspeed")
    run_dir, log = tmp_path / "quickstart", tmp_path / "launch.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_processes_naming(run_dir)) >= 3, log.read_text()[-2000:]  # runner, launch.py, 2 ranks
    left = faults.kill_group(proc, lambda: _processes_naming(run_dir), wait_s=20)
    proc.wait()
    assert not left, "processes outlived launch"


# ------------------------------------------------------------------ W&B


def _wandb_history(folder: Path) -> tuple[dict, list[tuple[int, float]]]:
    """The run record ({} when W&B never flushed one) and the (step, loss) of each history record
    of an offline run folder, read with W&B's own reader."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(folder)],
                         capture_output=True, text=True, timeout=120).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    run_record = next((r["run"] for r in records if r["type"] == "run"), {})
    history = [(r["history"]["item"]["step"], r["history"]["item"]["loss"]) for r in records if r["type"] == "history"]
    return run_record, history


def test_a_resumed_job_continues_the_offline_wandb_run(tmp_path: Path, demo_cache: Path) -> None:
    """The first job is killed (the whole launcher) after logging a step past its checkpoint; W&B
    keeps only what its writer had flushed (often nothing: it flushes every 15 s). The second job
    continues the same run, catching up from metrics.jsonl what W&B lost: every step 1..6 exactly
    once over the two offline folders, with the losses of metrics.jsonl."""
    cmd = launch_cmd(tmp_path, demo_cache, "train.max_steps=6", "checkpoint.every_steps=2", "logging.wandb_mode=offline")
    run_dir, log = tmp_path / "quickstart", tmp_path / "first.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole launcher; its ranks die with it
    proc.wait()
    resumed_from = find_resume_point(run_dir / "checkpoints").marker.step
    assert 2 <= resumed_from < 6, log.read_text()[-2000:]
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]

    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    (first, first_history), (second, second_history) = (_wandb_history(f) for f in folders)
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    assert all(folder.name.endswith(f"-{run_id}") for folder in folders)
    assert second["run_id"] == run_id and second.get("resume") is True and not first.get("resume")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert first_history + second_history == [(r["step"], r["loss"]) for r in rows]
    print(f"W&B: the killed job's folder holds steps {[s for s, _ in first_history]}, the resumed job's"
          f" {[s for s, _ in second_history]} (resumed from step {resumed_from})")
