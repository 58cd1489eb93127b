"""Rank discovery for every way a rank can be started (no process group is created here)."""

from __future__ import annotations

import pytest

from ds_simclr.runtime import export_rank_env

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MANAGER_VARS = (
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMI_RANK", "PMI_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_NTASKS",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RANK_VARS + MANAGER_VARS:
        monkeypatch.delenv(name, raising=False)


def rank_env() -> tuple[str, str, str, str]:
    import os

    export_rank_env()
    return os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"]


def test_launcher_variables_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    assert rank_env() == ("3", "4", "1", "2")


def test_open_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in zip(MANAGER_VARS[:4], ("5", "8", "1", "4")):
        monkeypatch.setenv(name, value)
    assert rank_env() == ("5", "8", "1", "4")


def test_srun_step(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("SLURM_PROCID", "3"), ("SLURM_STEP_NUM_TASKS", "4"), ("SLURM_LOCALID", "1"),
                        ("SLURM_STEP_TASKS_PER_NODE", "2(x2)")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "h1")
    assert rank_env() == ("3", "4", "1", "2")


def test_a_batch_script_is_a_world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside sbatch (not an srun step) SLURM_PROCID/SLURM_NTASKS describe the job, not this process."""
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert rank_env() == ("0", "1", "0", "1")
