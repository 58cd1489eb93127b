"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from ds_simclr.hostlist import free_port

__all__ = ["CONFIGS", "REPO", "free_port", "tiny_spec_mapping", "train_and_capture"]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "ds_configs"


def tiny_spec_mapping(cache: Path, output_dir: Path, **train: object) -> dict:
    """A quick spec on the demo data: tiny encoder, 32^3 views, fp32 unless told otherwise."""
    return {
        "name": "t",
        "seed": 3,
        "output_dir": str(output_dir),
        "data": {"demo": True, "cache_dir": str(cache), "patch_size": 40, "num_workers": 1},
        "views": {"output_size": 32, "crop_min": 24},
        "model": {"encoder": "resenc_tiny", "head_hidden": 32, "head_out": 16, "head_layers": 2},
        "optimizer": {"lr": 0.01},
        "schedule": {"warmup_steps": 2, "min_lr_ratio": 0.1},
        "train": {"global_batch": 4, "steps_per_epoch": 3, "epochs": 2, "precision": "fp32", **train},
        "checkpoint": {"every_steps": 100, "keep_last": 2},
        "logging": {"wandb_mode": "disabled", "log_every": 1},
    }


def train_and_capture(mapping: dict) -> dict:
    """Rank function: build a Trainer, train it, and return rank-local weights: the module's at the
    start (`initial`), the fp32 master weights at the end (`master`, a collective) and the module's
    bf16 weights at the end (`module`), all as fp32 CPU tensors keyed by state-dict name."""
    from deepspeed.utils import safe_get_full_fp32_param

    from ds_simclr.engine import Trainer
    from ds_simclr.specload import spec_from_mapping

    trainer = Trainer(spec_from_mapping(mapping))
    module = trainer.engine.module
    initial = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    trainer.run()
    master = {name: safe_get_full_fp32_param(p).clone() for name, p in module.named_parameters(remove_duplicate=False)}
    return {"initial": initial, "master": master, "module": {k: v.detach().float().clone() for k, v in module.state_dict().items()}}
