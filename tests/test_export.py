"""Export for downstream fine-tuning: nnSSL's file layout, loadable with weights_only=True, and the
exported fp32 weights are exactly the trained ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_spec_mapping
from multiproc import run_ranks

from ds_simclr.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _train_and_keep_weights(mapping: dict) -> dict[str, torch.Tensor]:
    from ds_simclr.engine import Trainer
    from ds_simclr.specload import spec_from_mapping

    trainer = Trainer(spec_from_mapping(mapping))
    trainer.run()
    return {k: v.detach().float().clone() for k, v in trainer.engine.module.state_dict().items()}


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_export_holds_the_trained_weights_under_nnssl_names(demo_cache: Path, tmp_path: Path, zero_stage: int) -> None:
    from ds_simclr.model import build_model

    mapping = tiny_spec_mapping(demo_cache, tmp_path, max_steps=2, zero_stage=zero_stage)
    trained = run_ranks(_train_and_keep_weights, 2, mapping)[0]
    run = tmp_path / "t"
    assert main(["export", str(run)]) == 0
    exported = torch.load(run / "export" / "nnssl_step_2.pth", weights_only=True)

    weights = exported["network_weights"]
    reference = build_model("resenc_tiny", head_hidden=32, head_out=16, head_layers=2).state_dict()
    assert list(weights) == list(reference)  # every key, aliases included, in nnSSL's order
    assert all(weights[k].dtype == torch.float32 for k in weights)
    for key, value in trained.items():
        assert torch.equal(weights[key], value), key  # fp32 run: master weights == module weights
    assert any(not torch.equal(weights[k], reference[k]) for k in reference)  # it trained

    plan = exported["nnssl_adaptation_plan"]
    assert plan["key_to_encoder"] == "encoder.stages" and plan["key_to_stem"] == "encoder.stem"
    assert all(any(k.startswith(p) for k in weights) for p in plan["keys_to_in_proj"])
    assert plan["recommended_downstream_patchsize"] == [32, 32, 32] and plan["pretrain_num_input_channels"] == 1
    json.dumps(plan)  # plain types only


def test_export_of_a_run_without_checkpoint_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "spec.yaml").write_text("{}")
    assert main(["export", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_the_recipe_exports_as_nnssl_resencl() -> None:
    from helpers import CONFIGS

    from ds_simclr.export import adaptation_plan
    from ds_simclr.specload import load_spec

    plan = adaptation_plan(load_spec(CONFIGS / "ssl3d_resencl_3x4.yaml"), None)
    assert plan["architecture_plans"] == {"arch_class_name": "ResEncL", "arch_kwargs": None, "arch_kwargs_requiring_import": None}
    assert plan["recommended_downstream_patchsize"] == [160, 160, 160]
