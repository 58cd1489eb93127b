"""The ResEnc encoder family as plain numbers (no torch), shared by the model and the plan.

nnSSL's ResEnc-L is dynamic-network-architectures' ResidualEncoder with these stages; the smaller
members keep its layout (stem, BasicBlockD stages, stride 2 from stage 2 on) for CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderArch:
    """Per-stage widths, residual blocks and strides of one ResEnc variant."""

    features: tuple[int, ...]
    blocks: tuple[int, ...]
    strides: tuple[int, ...]
    kernel_size: int = 3

    @property
    def stages(self) -> int:
        return len(self.features)

    @property
    def pooled_features(self) -> int:
        """Width of every stage's average-pooled output, concatenated (the head's input)."""
        return sum(self.features)

    @property
    def downsampling(self) -> int:
        """Total stride: inputs must be a multiple of this along every axis."""
        total = 1
        for stride in self.strides:
            total *= stride
        return total


ENCODERS: dict[str, EncoderArch] = {
    "resenc_l": EncoderArch(
        features=(32, 64, 128, 256, 320, 320), blocks=(1, 3, 4, 6, 6, 6), strides=(1, 2, 2, 2, 2, 2)
    ),
    "resenc_s": EncoderArch(
        features=(16, 32, 64, 128, 160, 160), blocks=(1, 2, 2, 2, 2, 2), strides=(1, 2, 2, 2, 2, 2)
    ),
    "resenc_tiny": EncoderArch(features=(8, 16, 32, 64), blocks=(1, 1, 1, 1), strides=(1, 2, 2, 2)),
}
