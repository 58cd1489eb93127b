"""Shared test fixtures: paths, free ports, DeepSpeed on the CPU accelerator."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "ds_configs"


def free_port() -> int:
    """A TCP port that was free a moment ago (tests run in parallel with other jobs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
