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


@pytest.fixture(scope="session")
def eval_cache(demo_cache: Path) -> Path:
    """The demo cache with the evaluation volume built into it (as `launch` does for the online probe)."""
    from ds_simclr.evaluation.atlas import ensure_eval_set

    ensure_eval_set(demo_cache)
    return demo_cache


@pytest.fixture(scope="session")
def short_run(eval_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-rank run shared by the export, evaluate and online-probe tests: tiny encoder, bf16, ZeRO-1,
    4 steps, warm-started from an export of a seeded model, probed every 2 steps, offline W&B.

    Returns its run dir, the warm-start source weights, and rank 0's module weights at the start, the
    fp32 master weights and the bf16 module weights at the end."""
    import torch
    from helpers import train_and_capture, tiny_spec_mapping
    from multiproc import run_ranks

    from ds_simclr.model import build_model

    out = tmp_path_factory.mktemp("short_run")
    torch.manual_seed(1234)
    source = build_model("resenc_tiny", head_hidden=32, head_out=16, head_layers=2).state_dict()
    torch.save({"network_weights": source, "nnssl_adaptation_plan": {}}, out / "source.pth")
    mapping = tiny_spec_mapping(eval_cache, out, max_steps=4, precision="bf16", zero_stage=1)
    mapping["model"]["init_from"] = str(out / "source.pth")
    mapping["eval"] = {"every_steps": 2, "patches_per_class": 3}
    mapping["logging"]["wandb_mode"] = "offline"
    captured = run_ranks(train_and_capture, 2, mapping)[0]
    return {"run": out / "t", "source": source, **captured}
