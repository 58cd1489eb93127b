"""`plan`'s memory section: the activation count against what autograd really keeps, and the warning.

The count is checked against the bytes of distinct tensors autograd saves in one forward
(saved_tensors_hooks), plain and with activation checkpointing, for two encoders; the warning must
name a fix that `plan` itself then accepts.
"""

from __future__ import annotations

import pytest
import torch
from helpers import CONFIGS
from torch import nn

from ds_simclr.architectures import ENCODERS
from ds_simclr.model import build_model, configure_speed
from ds_simclr.dsconfig import plan_batch
from ds_simclr.planning import activation_elements, memory_lines, plan_report
from ds_simclr.specload import load_spec

SSL3D = CONFIGS / "ssl3d_resencl_3x4.yaml"


def _saved_bytes(model: nn.Module, x: torch.Tensor, segment_of: dict[nn.Module, str] | None = None) -> dict[str, int]:
    """Bytes of distinct non-parameter storages saved for backward in one encoder forward, by segment."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}
    current = ["all"]
    for module, name in (segment_of or {}).items():
        module.register_forward_pre_hook(lambda _m, _i, name=name: current.__setitem__(0, name))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (current[0], storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    by_segment: dict[str, int] = {}
    for name, nbytes in seen.values():
        by_segment[name] = by_segment.get(name, 0) + nbytes
    return by_segment


@pytest.mark.parametrize(("encoder", "size"), [("resenc_tiny", 32), ("resenc_s", 64)])
def test_activation_count_matches_what_autograd_saves(encoder: str, size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, size, size, size)  # fp32: 4 bytes per element
    predicted = activation_elements(ENCODERS[encoder], size, in_channels=1)
    plain = build_model(encoder).encoder
    segments = {plain.stem: "stem", **{stage: f"stage{k}" for k, stage in enumerate(plain.stages)}}
    measured = _saved_bytes(plain, x, segments)
    assert 4 * predicted.plain == pytest.approx(sum(measured.values()), rel=1e-3)
    # a segment recomputed in backward saves its maps again, but not its input (that is the boundary)
    largest_segment = max(nbytes - 4 * x.numel() * (name == "stem") for name, nbytes in measured.items())
    assert 4 * predicted.largest_segment == pytest.approx(largest_segment, rel=1e-3)
    checkpointed = configure_speed(build_model(encoder), activation_checkpointing=True).encoder
    assert 4 * predicted.boundaries == sum(_saved_bytes(checkpointed, x).values())


def _plan(*overrides: str) -> str:
    """The memory section of `plan` for the recipe on its 12 ranks."""
    spec = load_spec(SSL3D, list(overrides))
    return "\n".join(memory_lines(spec, plan_batch(spec, 12)))


def test_recipe_fits_80_gib_and_the_estimate_is_shown() -> None:
    text = plan_report(load_spec(SSL3D)).text
    assert "WARNING" not in text
    assert "activations 53.56 GiB" in text and "40.83 GiB with train.activation_checkpointing" in text


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        (["distributed.gpu_memory_gib=50"], ["train.activation_checkpointing=true"]),
        (["distributed.gpu_memory_gib=40"], ["train.micro_batch=5", "train.grad_accum=2"]),
        (["distributed.gpu_memory_gib=20", "train.activation_checkpointing=true"],
         ["train.micro_batch=2", "train.grad_accum=5"]),
    ],
)
def test_warning_names_a_fix_that_plan_accepts(overrides: list[str], fix: list[str]) -> None:
    text = _plan(*overrides)
    warning = next(line for line in text.splitlines() if "WARNING" in line)
    assert "exceeds distributed.gpu_memory_gib" in warning
    for setting in fix:
        key, value = setting.split("=")
        assert f"{key}: {value}" in warning or f"{key} {value}" in warning, warning
    assert "WARNING" not in _plan(*overrides, *fix)


def test_nothing_fits_says_so() -> None:
    assert "none fits one pair" in _plan("distributed.gpu_memory_gib=0.5")
