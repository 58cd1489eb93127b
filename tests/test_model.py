"""Encoders and head: nnSSL's state-dict names and shapes, parameter counts, shapes, dtypes, errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ds_simclr.loss import nt_xent
from ds_simclr.model import (
    ENCODER_NAMES,
    ENCODERS,
    build_model,
    check_input_shape,
    count_parameters,
    encoder_feature_dim,
)

NNSSL_RECORD = json.loads((Path(__file__).parent / "data" / "resenc_l_state_dict.json").read_text())


@pytest.fixture(scope="module")
def resenc_l() -> nn.Module:
    return build_model("resenc_l")


def test_resenc_l_state_dict_is_nnssls(resenc_l: nn.Module) -> None:
    ours = {name: list(t.shape) for name, t in resenc_l.state_dict().items()}
    theirs = NNSSL_RECORD["state_dict"]
    assert sorted(set(theirs) - set(ours)) == [], "keys nnSSL has that we lack"
    assert sorted(set(ours) - set(theirs)) == [], "keys we have that nnSSL lacks"
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}, "shape mismatches"
    assert list(ours) == list(theirs), "same keys, different order"


def test_resenc_l_parameter_counts(resenc_l: nn.Module) -> None:
    counts = NNSSL_RECORD["parameters"]
    assert count_parameters(resenc_l.encoder) == counts["encoder"] == 90_296_576
    assert count_parameters(resenc_l.projector) == counts["projector"]
    assert count_parameters(resenc_l) == counts["total"]


def test_adaptation_keys_exist(resenc_l: nn.Module) -> None:
    """The keys nnSSL's adaptation plan names (key_to_stem, key_to_encoder, keys_to_in_proj)."""
    keys = resenc_l.state_dict().keys()
    for prefix in ("encoder.stem.", "encoder.stages.", "encoder.stem.convs.0.conv.", "encoder.stem.convs.0.all_modules.0."):
        assert any(k.startswith(prefix) for k in keys), prefix


def test_registry() -> None:
    assert ENCODER_NAMES == ("resenc_l", "resenc_s", "resenc_tiny")
    assert encoder_feature_dim("resenc_l") == 1120
    assert encoder_feature_dim("resenc_tiny") == sum(ENCODERS["resenc_tiny"].features)
    with pytest.raises(ValueError, match="resenc_tiny"):
        build_model("resenc_xl")
    with pytest.raises(ValueError):
        build_model("resenc_tiny", head_layers=0)


@pytest.mark.parametrize("size", [32, 64])
def test_tiny_forward_shapes(size: int) -> None:
    torch.manual_seed(0)
    model = build_model("resenc_tiny", head_hidden=64, head_out=32)
    x = torch.randn(2, 1, size, size, size)
    stages = model.encoder(x)
    assert [tuple(s.shape) for s in stages] == [
        (2, f, size // d, size // d, size // d) for f, d in zip((8, 16, 32, 64), (1, 2, 4, 8))
    ]
    assert model.features(x).shape == (2, encoder_feature_dim("resenc_tiny"))
    out = model(x)
    assert out.shape == (2, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_tiny_backward_through_loss_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_model("resenc_tiny", in_channels=2, head_hidden=32, head_out=16, head_layers=2)
    x1, x2 = torch.randn(3, 2, 32, 32, 32), torch.randn(3, 2, 32, 32, 32)
    nt_xent(model(x1), model(x2), 0.5).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_bf16_forward_like_deepspeed() -> None:
    torch.manual_seed(0)
    model = build_model("resenc_tiny", head_hidden=64, head_out=32).to(torch.bfloat16)
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.bfloat16)  # at 16^3 (2^3 deepest) CPU bf16 conv backward is flaky
    z1, z2 = model(x), model(x.flip(-1))
    assert z1.dtype == torch.bfloat16 and torch.isfinite(z1.float()).all()
    loss = nt_xent(z1, z2, 0.5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all() for g in grads)


def test_channels_last_3d_gives_same_output() -> None:
    torch.manual_seed(0)
    model = build_model("resenc_tiny", head_hidden=32, head_out=16).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last_3d)
    got = model(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_resenc_l_forward_at_smallest_cube(resenc_l: nn.Module) -> None:
    with torch.no_grad():
        out = resenc_l(torch.randn(1, 1, 64, 64, 64))
    assert out.shape == (1, 2048) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name,shape",
    [("resenc_tiny", (4, 4, 4)), ("resenc_tiny", (8, 8, 8)), ("resenc_tiny", (36, 32, 32)), ("resenc_l", (32, 32, 32))],
)
def test_too_small_or_misaligned_input_is_a_clear_error(name: str, shape: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match=rf"multiple of {ENCODERS[name].downsampling}"):
        check_input_shape(name, shape)
    model = build_model(name, head_hidden=8, head_out=8)
    with pytest.raises(ValueError, match=r"does not fit encoder"):
        model(torch.randn(1, 1, *shape))


def test_wrong_channel_count_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"expected input \(B, 1, X, Y, Z\)"):
        build_model("resenc_tiny")(torch.randn(1, 2, 32, 32, 32))


def test_non_cubic_input_is_accepted() -> None:
    check_input_shape("resenc_l", (64, 32, 32))
    check_input_shape("resenc_l", (160, 160, 160))
    assert build_model("resenc_tiny", head_hidden=8, head_out=8)(torch.randn(2, 1, 16, 8, 8)).shape == (2, 8)


def test_head_norm_matches_nnssl_instancenorm1d_on_2d_input() -> None:
    """nnSSL applies InstanceNorm1d(affine=False) to (B, H); torch treats that as one unbatched sample."""
    model = build_model("resenc_tiny", head_hidden=24, head_out=8)
    ours = model.projector.layer1[1]
    x = torch.randn(5, 24) * 3 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = nn.InstanceNorm1d(24, affine=False, track_running_stats=False)(x)
    torch.testing.assert_close(ours(x), theirs, rtol=1e-5, atol=1e-5)


def test_numerically_equal_to_dynamic_network_architectures() -> None:
    """Same weights, same outputs as d-n-a's ResidualEncoder (skipped where it is not installed)."""
    dna = pytest.importorskip("dynamic_network_architectures.building_blocks.residual_encoders")
    arch = ENCODERS["resenc_tiny"]
    theirs = dna.ResidualEncoder(
        1, len(arch.features), list(arch.features), nn.Conv3d, 3, list(arch.strides), list(arch.blocks),
        conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, return_skips=True,
    )
    ours = build_model("resenc_tiny").encoder
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 1, 32, 32, 32)
    for a, b in zip(ours(x), theirs(x)):
        torch.testing.assert_close(a, b)
