"""bf16 runs reduce and accumulate gradients in fp32 (DeepSpeed's BF16_Optimizer under ZeRO-1).

A checkpoint written before (bf16 gradients, DeepSpeed's ZeRO optimizer) resumes into the new
optimizer with the same weights and fp32 master weights, and `export` reads the new layout (which
DeepSpeed's zero_to_fp32 refuses) to the exact fp32 master weights. Exact resume and non-finite
skipping under BF16_Optimizer are the bf16 tests of test_engine.py, which now run on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_spec_mapping
from multiproc import run_ranks

from ds_simclr.cli import main
from ds_simclr.dsconfig import deepspeed_config
from ds_simclr.specload import spec_from_mapping

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_bf16_configs_reduce_and_accumulate_gradients_in_fp32(tmp_path: Path) -> None:
    mapping = tiny_spec_mapping(tmp_path, tmp_path, precision="bf16")
    config = deepspeed_config(spec_from_mapping(mapping), 2)
    assert config["communication_data_type"] == "fp32" and config["data_types"]["grad_accum_dtype"] == "fp32"
    mapping["train"]["zero_stage"] = 2  # DeepSpeed takes fp32 accumulation under bf16 with ZeRO-1 only
    config = deepspeed_config(spec_from_mapping(mapping), 2)
    assert config["communication_data_type"] == "fp32" and "grad_accum_dtype" not in config["data_types"]
    assert "communication_data_type" not in deepspeed_config(spec_from_mapping(tiny_spec_mapping(tmp_path, tmp_path)), 2)


def _masters(engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master weight (DeepSpeed's API; a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().clone() for name, p in engine.module.named_parameters()}


def _train(mapping: dict, stop_at: int | None, old_config: bool) -> dict[str, Any]:
    """The real Trainer; old_config: the DeepSpeed JSON as written before fp32 gradients."""
    import ds_simclr.engine as engine_module

    if old_config:
        real = engine_module.deepspeed_config

        def without_fp32_gradients(spec: Any, world: int) -> dict:
            config = real(spec, world)
            del config["communication_data_type"], config["data_types"]["grad_accum_dtype"]
            return config

        engine_module.deepspeed_config = without_fp32_gradients
    trainer = engine_module.Trainer(spec_from_mapping(mapping))
    loaded = {"module": {k: v.float().clone() for k, v in trainer.engine.module.state_dict().items()},
              "masters": _masters(trainer.engine), "step": trainer.state.step}
    trainer.run(stop_at=stop_at)
    return {"optimizer": type(trainer.engine.optimizer).__name__, "loaded": loaded, "masters": _masters(trainer.engine),
            "module": {k: v.float().clone() for k, v in trainer.engine.module.state_dict().items()},
            "skipped": trainer.state.skipped_steps}


def test_an_old_checkpoint_resumes_and_export_reads_the_fp32_masters(demo_cache: Path, tmp_path: Path) -> None:
    mapping = tiny_spec_mapping(demo_cache, tmp_path, precision="bf16", max_steps=2)
    mapping["schedule"]["warmup_steps"] = 0  # step 1 at the peak LR: it moves the weights
    old = run_ranks(_train, 2, mapping, 1, True)[0]
    new = run_ranks(_train, 2, mapping, None, False)[0]
    assert (old["optimizer"], new["optimizer"]) == ("DeepSpeedZeroOptimizer", "BF16_Optimizer")
    assert new["loaded"]["step"] == 1
    for name, value in old["module"].items():
        assert torch.equal(new["loaded"]["module"][name], value), name
    for name, value in old["masters"].items():
        assert torch.equal(new["loaded"]["masters"][name], value), name

    assert main(["export", str(tmp_path / "t")]) == 0
    weights = torch.load(tmp_path / "t/export/nnssl_step_2.pth", weights_only=True)["network_weights"]
    for name, master in new["masters"].items():
        assert torch.equal(weights[name], master), name  # the fp32 masters, not the bf16 module weights
    assert any(not torch.equal(weights[n], new["module"][n]) for n in new["masters"])  # finer than bf16
    assert all(torch.equal(weights[n].bfloat16().float(), new["module"][n]) for n in new["masters"])
