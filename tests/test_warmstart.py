"""`model.init_from`: a run starts from an export's weights (ours or nnSSL's), or refuses it in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, tiny_spec_mapping

from ds_simclr.cli import main
from ds_simclr.errors import DataError
from ds_simclr.model import build_model
from ds_simclr.specload import spec_from_mapping
from ds_simclr.warmstart import initial_model

STEM = "encoder.stem.convs.0.conv.weight"


def _spec(tmp_path: Path, init_from: Path | None, **model: object):
    mapping = tiny_spec_mapping(tmp_path / "cache", tmp_path)
    mapping["model"].update(init_from=str(init_from) if init_from else None, **model)
    return spec_from_mapping(mapping)


def _save(path: Path, weights: dict, plan: dict | None = None) -> Path:
    torch.save({"network_weights": weights, "nnssl_adaptation_plan": plan or {}}, path)
    return path


def _source(encoder: str = "resenc_tiny", in_channels: int = 1, head_out: int = 16) -> torch.nn.Module:
    torch.manual_seed(1234)
    return build_model(encoder, in_channels, head_hidden=32, head_out=head_out, head_layers=2)


def test_encoder_and_head_come_from_our_export(tmp_path: Path) -> None:
    source = _source()
    spec = _spec(tmp_path, _save(tmp_path / "e.pth", source.state_dict()))
    model, words = initial_model(spec)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    assert "projection head" in words
    seeded, _ = initial_model(spec, warm=False)
    assert not torch.equal(seeded.state_dict()[STEM], model.state_dict()[STEM])  # it did change the weights


def test_a_head_of_another_size_keeps_its_seeded_start(tmp_path: Path) -> None:
    source = _source(head_out=8)
    spec = _spec(tmp_path, _save(tmp_path / "e.pth", source.state_dict()))
    model, words = initial_model(spec)
    seeded, _ = initial_model(spec, warm=False)
    for key, value in model.state_dict().items():
        expected = source.state_dict()[key] if key.startswith("encoder.") else seeded.state_dict()[key]
        assert torch.equal(value, expected), key
    assert "projection head" not in words


def test_an_nnssl_checkpoint_with_a_decoder_and_other_prefixes(tmp_path: Path) -> None:
    """nnSSL MAE checkpoints hold a whole ResidualEncoderUNet (decoder too); the plan says where the encoder is."""
    dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    network = dna.ResidualEncoderUNet(
        1, 4, [8, 16, 32, 64], torch.nn.Conv3d, 3, [1, 2, 2, 2], [1, 1, 1, 1], 2, [1, 1, 1], conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
    )
    weights = {f"backbone.{k}": v for k, v in network.state_dict().items()}
    plan = {"key_to_encoder": "backbone.encoder.stages", "key_to_stem": "backbone.encoder.stem"}
    spec = _spec(tmp_path, _save(tmp_path / "mae.pth", weights, plan))
    model, words = initial_model(spec)
    for key, value in model.state_dict().items():
        if key.startswith("encoder."):
            assert torch.equal(value, network.state_dict()[key]), key
    assert "projection head" not in words


@pytest.mark.parametrize("case", ["missing", "not_torch", "other_encoder", "four_channels", "no_weights"])
def test_a_bad_export_is_one_line_naming_the_field(tmp_path: Path, case: str) -> None:
    path = tmp_path / "e.pth"
    if case == "not_torch":
        path.write_text("not a checkpoint")
    elif case == "other_encoder":
        _save(path, _source("resenc_s").state_dict())
    elif case == "four_channels":  # a fine-tuned multi-modal export: runs train on single images
        _save(path, _source(in_channels=4).state_dict())
    elif case == "no_weights":
        torch.save({"state_dict": {}}, path)
    with pytest.raises(DataError) as info:
        initial_model(_spec(tmp_path, path))
    line = info.value.one_line()
    assert "model.init_from" in line and str(path) in line and "\n" not in line
    if case == "other_encoder":
        assert "encoder.stem.convs.0.conv.weight has shape (16, 1, 3, 3, 3)" in line
    if case == "four_channels":
        assert f"{STEM} has shape (8, 4, 3, 3, 3) in the export, the run's model wants (8, 1, 3, 3, 3)" in line


def test_launch_refuses_a_missing_init_from_before_anything_starts(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.pth"
    code = main(["launch", str(CONFIGS / "quickstart.yaml"), "--dry-run", "--set", f"model.init_from={missing}",
                 "--set", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model.init_from" in err and "file not found" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "quickstart").exists()
