"""Shared test fixtures: paths, free ports, DeepSpeed on the CPU accelerator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")

from helpers import free_port


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the preprocessed demo store, built once per test session."""
    from ds_simclr.data.demo import ensure_demo_store

    cache = tmp_path_factory.mktemp("cache")
    ensure_demo_store(cache)
    return cache
