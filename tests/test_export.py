"""The export is what the downstream readers load: nnSSL's layout, aliases sharing storage, the fp32
master weights of a bf16 ZeRO-1 run, loaded into d-n-a's real ResidualEncoderUNet by nnU-Net's and
SSL3D classification's rules for 1 and 4 input channels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS
from readers import classification_load, network_from_plan, nnunet_load

from ds_simclr.cli import main

# Field names of nnSSL's dataclasses (nnssl: experiment_planning/experiment_planners/plan.py and
# adaptation_planning/adaptation_plan.py), which deserialise the file with `Plan.from_dict` etc.
NNSSL_PLAN = {"dataset_name", "plans_name", "original_median_spacing_after_transp", "image_reader_writer",
              "transpose_forward", "transpose_backward", "configurations", "experiment_planner_used"}
NNSSL_CONFIGURATION = {"data_identifier", "preprocessor_name", "spacing_style", "normalization_schemes",
                       "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_mask",
                       "resampling_fn_mask_kwargs", "spacing", "patch_size"}
NNSSL_ADAPTATION = {"architecture_plans", "pretrain_plan", "pretrain_num_input_channels",
                    "recommended_downstream_patchsize", "key_to_encoder", "key_to_stem", "keys_to_in_proj", "key_to_lpe"}
STEM = "encoder.stem.convs.0.conv.weight"
STEM_ALIAS = "encoder.stem.convs.0.all_modules.0.weight"


@pytest.fixture(scope="module")
def exported(short_run: dict) -> dict:
    assert main(["export", str(short_run["run"])]) == 0
    path = short_run["run"] / "export" / "nnssl_step_4.pth"
    return {"path": path, **short_run, "file": torch.load(path, weights_only=True)}


@pytest.mark.slow
@pytest.mark.distributed
def test_exported_weights_are_the_fp32_master_weights_with_shared_aliases(exported: dict) -> None:
    from ds_simclr.model import build_model

    weights = exported["file"]["network_weights"]
    reference = build_model("resenc_tiny", head_hidden=32, head_out=16, head_layers=2)
    assert list(weights) == list(reference.state_dict())  # every key, aliases included, in nnSSL's order
    assert all(w.dtype == torch.float32 for w in weights.values())
    for key, master in exported["master"].items():
        assert torch.equal(weights[key], master), key
    # bf16 hides nothing here: the module's bf16 weights differ from the fp32 master weights.
    assert any(not torch.equal(weights[k], v) for k, v in exported["module"].items())
    # Keys naming one parameter share one tensor, so each parameter is stored once.
    for name, param in reference.named_parameters(remove_duplicate=False):
        twin = next(n for n, p in reference.named_parameters(remove_duplicate=False) if p is param)
        assert weights[name].data_ptr() == weights[twin].data_ptr(), (name, twin)
    unique = sum(p.numel() for p in reference.parameters())
    size = exported["path"].stat().st_size
    assert abs(size - 4 * unique) <= 0.05 * 4 * unique, (size, 4 * unique)


@pytest.mark.slow
@pytest.mark.distributed
def test_plan_has_nnssl_layout_with_spacing_and_patch_size(exported: dict) -> None:
    plan = exported["file"]["nnssl_adaptation_plan"]
    assert set(plan) == NNSSL_ADAPTATION
    pretrain = plan["pretrain_plan"]
    assert set(pretrain) == NNSSL_PLAN
    name, configuration = next(iter(pretrain["configurations"].items()))  # what preprocess_like_nnssl reads
    assert len(pretrain["configurations"]) == 1 and name == "onemmiso"
    assert set(configuration) == NNSSL_CONFIGURATION
    assert configuration["spacing"] == [1.0, 1.0, 1.0] and configuration["patch_size"] == [32, 32, 32]
    assert configuration["normalization_schemes"] == ["ZScoreNormalization"]
    assert pretrain["dataset_name"] == "ds_simclr_demo"
    assert plan["recommended_downstream_patchsize"] == [32, 32, 32] and plan["pretrain_num_input_channels"] == 1
    json.dumps(plan)  # plain types only


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("channels", [1, 4])
def test_nnunet_loader_takes_encoder_and_stem(exported: dict, channels: int) -> None:
    pytest.importorskip("dynamic_network_architectures")
    network = network_from_plan(exported["file"]["nnssl_adaptation_plan"], channels)
    nnunet_load(network, exported["path"], channels)
    loaded = network.state_dict()
    for key, master in exported["master"].items():
        if key in (STEM, STEM_ALIAS):
            master = master.repeat(1, channels, 1, 1, 1) / channels
        if key.startswith("encoder."):
            assert torch.equal(loaded[key], master), key


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("channels", [1, 4])
def test_classification_loader_finds_aliases_by_storage(exported: dict, channels: int, tmp_path: Path) -> None:
    pytest.importorskip("dynamic_network_architectures")
    network = network_from_plan(exported["file"]["nnssl_adaptation_plan"], channels)
    classification_load(network, exported["path"])
    loaded = network.state_dict()
    stem = exported["master"][STEM].repeat(1, channels, 1, 1, 1) / channels
    assert torch.equal(loaded[STEM], stem) and torch.equal(loaded["decoder.encoder.stem.convs.0.conv.weight"], stem)
    assert all(torch.equal(loaded[k], v) for k, v in exported["master"].items() if k.startswith("encoder.stages"))
    if channels > 1:  # an export that clones every key (the old one) fails this reader's shape check
        cloned = {k: v.clone() for k, v in exported["file"]["network_weights"].items()}
        torch.save({**exported["file"], "network_weights": cloned}, tmp_path / "cloned.pth")
        with pytest.raises(AssertionError, match="shape of encoder.stem.convs.0.conv.weight"):
            classification_load(network_from_plan(exported["file"]["nnssl_adaptation_plan"], channels), tmp_path / "cloned.pth")


def test_export_of_a_run_without_checkpoint_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "spec.yaml").write_text("{}")
    assert main(["export", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("encoder", ["resenc_l", "resenc_s"])
def test_architecture_plans_build_the_same_encoder_in_dna(encoder: str) -> None:
    """ResEncL is nnSSL's preset; the others are ResidualEncoderUNet kwargs d-n-a builds with our keys and shapes."""
    pytest.importorskip("dynamic_network_architectures")
    from ds_simclr.export import architecture_plans
    from ds_simclr.model import build_model

    if encoder == "resenc_l":
        from ds_simclr.specload import load_spec

        spec = load_spec(CONFIGS / "ssl3d_resencl_3x4.yaml")
        assert architecture_plans(spec.model.encoder)["arch_class_name"] == "ResEncL"
    network = network_from_plan({"architecture_plans": architecture_plans(encoder)}, 1)
    theirs = {k: v.shape for k, v in network.state_dict().items() if k.startswith("encoder.")}
    ours = {k: v.shape for k, v in build_model(encoder, head_hidden=8, head_out=8).state_dict().items() if k.startswith("encoder.")}
    assert theirs == ours
