"""The ResEnc encoder family as plain numbers (no torch), shared by the model and the plan.

nnSSL's ResEnc-L is dynamic-network-architectures' ResidualEncoder with these stages; the smaller
members keep its layout (stem, BasicBlockD stages, stride 2 from stage 2 on) for CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class EncoderArch:
    """Per-stage widths, residual blocks and strides of one ResEnc variant."""

    features: tuple[int, ...]
    blocks: tuple[int, ...]
    strides: tuple[int, ...]
    kernel_size: int = 3

    def __post_init__(self) -> None:
        if not len(self.features) == len(self.blocks) == len(self.strides):
            raise ValueError("features, blocks and strides need one entry per stage")

    @property
    def feature_dim(self) -> int:
        """Width of every stage's average-pooled output, concatenated (the head's input)."""
        return sum(self.features)

    @property
    def downsampling(self) -> int:
        """Total stride: how much smaller the deepest stage is than the input, per axis."""
        return prod(self.strides)


ENCODERS: dict[str, EncoderArch] = {
    # nnSSL's ResEnc-L: 90.3 M encoder parameters (101.0 M with the default 1120-2048-2048-2048 head).
    "resenc_l": EncoderArch((32, 64, 128, 256, 320, 320), (1, 3, 4, 6, 6, 6), (1, 2, 2, 2, 2, 2)),
    # Same depth, half width and fewer blocks: a mid-sized member for quick GPU experiments.
    "resenc_s": EncoderArch((16, 32, 64, 128, 160, 160), (1, 2, 2, 2, 2, 2), (1, 2, 2, 2, 2, 2)),
    # Four stages, one block each: fast enough for CPU tests and demos at 32^3 - 64^3.
    "resenc_tiny": EncoderArch((8, 16, 32, 64), (1, 1, 1, 1), (1, 2, 2, 2)),
}
ENCODER_NAMES: tuple[str, ...] = tuple(ENCODERS)


def encoder_arch(name: str) -> EncoderArch:
    """The registered architecture called `name`; a clear error naming the choices otherwise."""
    try:
        return ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODER_NAMES)}") from None


def check_input_shape(name: str, spatial: tuple[int, ...] | list[int]) -> None:
    """Raise ValueError unless a (X, Y, Z) patch fits encoder `name`.

    Each axis must be a multiple of the total stride (strided convs round up, the ResNet-D skip's
    average pooling rounds down: any remainder makes their shapes disagree), and the deepest stage
    must keep more than one voxel (InstanceNorm needs it).
    """
    arch = encoder_arch(name)
    step = arch.downsampling
    n_down = sum(s > 1 for s in arch.strides)
    deepest = [s // step for s in spatial]
    if len(spatial) != 3 or min(spatial) < 1 or any(s % step for s in spatial) or prod(deepest) < 2:
        raise ValueError(
            f"input of spatial shape {tuple(spatial)} does not fit encoder {name!r}: each of the 3 axes must be "
            f"a positive multiple of {step} ({n_down} stride-2 stages) and the deepest stage needs more than one "
            f"voxel, e.g. {2 * step}x{step}x{step} or {2 * step}^3"
        )
