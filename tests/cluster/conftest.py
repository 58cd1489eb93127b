"""The session's SLURM cluster (tests/cluster/slurmsim.py): started once, always torn down."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.slurmsim import SlurmSim, missing


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = missing()
    if reason is not None:
        pytest.skip(f"no SLURM cluster: {reason}")
    sim = SlurmSim(Path(tmp_path_factory.mktemp("slurmsim")))
    try:
        sim.start()
        yield sim
    finally:
        sim.stop()
