"""Spec -> DeepSpeed JSON: batch arithmetic, DeepSpeed's own parser, a real initialize on 1 and 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import CONFIGS
from multiproc import run_ranks

from ds_simclr.cli import main
from ds_simclr.dsconfig import deepspeed_config, plan_batch, working_world_sizes
from ds_simclr.errors import BatchArithmeticError
from ds_simclr.planning import default_world_size
from ds_simclr.schedule import planned_lrs
from ds_simclr.specload import load_spec

SSL3D = CONFIGS / "ssl3d_resencl_3x4.yaml"
QUICKSTART = CONFIGS / "quickstart.yaml"


class DataParallelOnly:
    """The `mpu` hook DeepSpeed's config parser accepts, to check a config for W ranks in one process."""

    def __init__(self, world: int) -> None:
        self.world = world

    def get_data_parallel_world_size(self) -> int:
        return self.world


def test_ssl3d_recipe_on_12_ranks() -> None:
    config = deepspeed_config(load_spec(SSL3D), 12)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (120, 10, 1)
    assert config["zero_optimization"]["stage"] == 1 and config["bf16"]["enabled"]
    assert config["gradient_clipping"] == 0.1
    assert config["scheduler"]["params"]["total_num_steps"] == 68_750
    assert config["optimizer"]["params"]["weight_decay"] == 0.0


def test_world_size_7_names_the_sizes_that_work(capsys) -> None:
    assert main(["config", str(SSL3D), "--world-size", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert str(SSL3D) in err and "train.global_batch" in err
    assert "1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 24, 30, 40, 60, 120" in err


@pytest.mark.parametrize(
    ("train", "world", "expected"),
    [
        ({"global_batch": 120}, 12, (10, 1)),
        ({"global_batch": 120, "grad_accum": 2}, 12, (5, 2)),
        ({"global_batch": 120, "micro_batch": 5}, 12, (5, 2)),
        ({"global_batch": 120, "micro_batch": 5, "grad_accum": 2}, 12, (5, 2)),
        ({"global_batch": 8}, 1, (8, 1)),
    ],
)
def test_batch_rule(train: dict, world: int, expected: tuple[int, int]) -> None:
    spec = load_spec(SSL3D, [f"train.{k}={v}" for k, v in train.items()])
    batch = plan_batch(spec, world)
    assert (batch.micro_batch, batch.grad_accum) == expected
    assert batch.global_batch == train["global_batch"]
    assert batch.negatives_per_anchor == 2 * batch.micro_batch * world - 2


def test_impossible_splits_are_refused() -> None:
    spec = load_spec(SSL3D, ["train.micro_batch=5", "train.grad_accum=2"])
    assert working_world_sizes(spec) == [12]
    with pytest.raises(BatchArithmeticError, match="world sizes that work: 12"):
        plan_batch(spec, 6)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 12, 24])
def test_deepspeed_parser_accepts_generated_configs(world: int, monkeypatch) -> None:
    from deepspeed.runtime import config as ds_config_module
    from deepspeed.runtime.config import DeepSpeedConfig

    # The parser asks the process group for this rank; outside a job it would assume a world of 1.
    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda: 0)

    parsed = DeepSpeedConfig(deepspeed_config(load_spec(SSL3D), world), mpu=DataParallelOnly(world))
    assert parsed.train_batch_size == 120
    assert parsed.train_micro_batch_size_per_gpu * parsed.gradient_accumulation_steps * world == 120
    assert parsed.zero_optimization_stage == 1 and parsed.bfloat16_config.enabled
    assert parsed.gradient_clipping == 0.1
    assert parsed.scheduler_name == "WarmupCosineLR" and parsed.optimizer_name == "adamw"


@pytest.mark.parametrize("spec_path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_checked_in_json_is_not_stale(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    expected = deepspeed_config(spec, default_world_size(spec))
    shipped = spec_path.with_suffix(".json")
    assert shipped.is_file(), f"missing {shipped.name}: ds_simclr config {spec_path} -w N -o {shipped}"
    assert json.loads(shipped.read_text()) == expected, f"{shipped.name} is stale; regenerate it with ds_simclr config"


def test_plan_reports_and_plots(tmp_path: Path, capsys) -> None:
    assert main(["plan", str(SSL3D), "--plot", str(tmp_path / "lr.png")]) == 0
    out = capsys.readouterr().out
    assert "120 pairs/step = 10 micro x 1 accumulation x 12 ranks" in out
    assert "238 per anchor" in out and "68,750 optimizer steps" in out
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_planned_lr_curve_shape() -> None:
    spec = load_spec(QUICKSTART, ["train.max_steps=20", "schedule.warmup_steps=4"])
    lrs = planned_lrs(spec)
    peak = spec.peak_lr
    assert len(lrs) == 20
    assert lrs[:4] == pytest.approx([0.0, 0.25 * peak, 0.5 * peak, 0.75 * peak], rel=1e-6)
    assert lrs[4] == pytest.approx(peak, rel=0.02) and max(lrs) <= peak  # DeepSpeed's cosine starts at once
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # cosine never rises
    assert lrs[-1] == pytest.approx(spec.schedule.min_lr_ratio * peak, rel=0.05)
    no_warmup = planned_lrs(load_spec(SSL3D, ["train.max_steps=10"]))
    assert no_warmup[0] == pytest.approx(3e-4) and no_warmup[1] == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("command", "forbidden"),
    [
        (["validate"], ("torch", "deepspeed", "monai", "SimpleITK", "ds_simclr.model")),
        (["config", "-w", "12"], ("torch", "deepspeed", "monai", "SimpleITK", "ds_simclr.model")),
        # plan steps DeepSpeed's scheduler class (so imports its package), but builds nothing heavy
        (["plan"], ("monai", "SimpleITK", "ds_simclr.model", "ds_simclr.engine", "ds_simclr.data.loader")),
    ],
)
def test_fast_commands_import_nothing_heavy(command: list[str], forbidden: tuple[str, ...]) -> None:
    import subprocess
    import sys

    argv = [command[0], str(SSL3D), *command[1:]]
    code = (
        f"import sys; from ds_simclr.cli import main; main({argv!r});"
        f"print('LOADED', [m for m in {forbidden!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "LOADED []" in out


def _initialize_and_step(config: dict) -> list[float]:
    """deepspeed.initialize with a generated config on a tiny model; two optimizer steps."""
    import deepspeed
    import torch

    from ds_simclr.runtime import init_distributed
    from ds_simclr.schedule import prime

    init_distributed("gloo", 2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GroupNorm(4, 16), torch.nn.Linear(16, 4))
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    prime(scheduler)
    lrs = []
    for _ in range(2 * engine.gradient_accumulation_steps()):
        lrs.append(float(engine.get_lr()[0]))
        x = torch.randn(engine.train_micro_batch_size_per_gpu(), 8).to(engine.module[0].weight.dtype)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    return lrs


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2])
def test_deepspeed_initialize_with_generated_config(world: int) -> None:
    spec = load_spec(QUICKSTART, ["train.max_steps=10", "schedule.warmup_steps=0"])
    config = deepspeed_config(spec, world)
    results = run_ranks(_initialize_and_step, world, config)
    expected = planned_lrs(spec)[:2]
    for lrs in results:
        assert lrs == pytest.approx(expected)
