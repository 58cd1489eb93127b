"""The `data:` and `views:` sections of the run spec (pydantic only; nothing heavy is imported)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ds_simclr.data.recipe import ViewRecipe
from ds_simclr.specbase import StrictModel

MAX_OUTPUT_SIZE = 512
"""Largest view edge accepted; 512^3 float32 is 0.5 GiB per view, beyond any sane batch."""


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/ds_simclr`, else `~/.cache/ds_simclr`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "ds_simclr"


class DataSpec(StrictModel):
    """Where training volumes come from and how patches are read from the preprocessed store."""

    demo: bool = False
    """Use the embedded demo collection (real MRI volumes shipped by pip packages), built and
    preprocessed once into `cache_dir` by the first `launch` (again after a store format change).
    Exclusive with `manifest`/`store`."""

    manifest: Path | None = None
    """nnSSL `pretrain_data.json` to preprocess (into `store`, or into `cache_dir` when `store` is
    not given). `launch` preprocesses it with every core before the ranks start (a killed run
    resumes from the finished images); on several nodes it refuses and names the `ds_simclr data
    preprocess` command to run first. Once complete, the store is used as it is."""

    store: Path | None = None
    """Preprocessed store folder (output of `ds_simclr data preprocess`). Alone: train from it."""

    modalities: list[str] | None = None
    """Train only on images whose modality is in this list (e.g. `[T1w, T2w]`); null keeps all."""

    cache_dir: Path = Field(default_factory=default_cache_dir)
    """Folder for the demo collection and for stores built from a manifest without `store`."""

    patch_size: int = Field(default=160, ge=16, le=512)
    """Edge (voxels, 1 mm after preprocessing) of the isotropic patch read per sample; views are
    cropped from it. Larger patches give more varied crops but cost more reading and memory."""

    num_workers: int = Field(default=4, ge=0, le=64)
    """Threads reading patches per rank (0 = read in the producer thread). More hides disk latency;
    reading is memory-mapped so a few are usually enough."""

    prefetch: int = Field(default=2, ge=1, le=64)
    """Micro-batches made ahead of the training step. Each costs 2 x micro_batch views of memory."""

    max_open_files: int = Field(default=64, ge=2, le=65536)
    """File descriptors (and memory maps) a rank's patch reading holds at most, whatever the store
    size: open volumes hold one each (opening one holds a second for a moment), and the least
    recently used idle volume is closed to open another. Keeps a rank within `ulimit -n` and
    `vm.max_map_count` on 100k-volume stores; more saves re-opening (cheap on a local disk, a
    metadata request on Lustre/GPFS)."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        has_files = self.manifest is not None or self.store is not None
        if self.demo == has_files:
            raise ValueError(
                "give either `demo: true` or a `store` and/or `manifest`, not both and not neither"
            )
        if self.modalities is not None and not self.modalities:
            raise ValueError("`modalities` is empty: remove it to keep all images, or list some")
        return self


class ViewsSpec(StrictModel):
    """How two views are made from each patch; the default is the OpenMind challenge SimCLR recipe.

    Spatial steps (random crop, resize, flip, rotation) then intensity steps (shift, contrast) and
    optional MRI physics (bias field, noise, blur, gamma; off by default with probability 0).
    """

    output_size: int = Field(default=160, ge=8, le=MAX_OUTPUT_SIZE)
    """Edge (voxels) of each cubic view fed to the encoder. Cost grows with its cube."""

    crop_min: int = Field(default=60, ge=4, le=MAX_OUTPUT_SIZE)
    """Smallest random crop edge (voxels, drawn per axis up to the patch size) before resizing to
    `output_size`. Small crops give harder, more zoomed views."""

    flip_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    """Probability of a flip: of one random axis (recipe), or of each axis if `flip_all_axes`."""

    flip_all_axes: bool = False
    """Flip every axis independently with `flip_prob` instead of one random axis."""

    rotate_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    """Probability of a rotation about the view centre (border padding, trilinear)."""

    rotate_range_deg: tuple[float, float, float] = (45.0, 0.0, 0.0)
    """Maximum rotation (degrees, drawn uniformly in +-range) about array axes 0, 1, 2 (MONAI's
    range_x/y/z). The recipe rotates about axis 0 only, which is cheaper on CPU."""

    shift_prob: float = Field(default=0.8, ge=0.0, le=1.0)
    """Probability of adding a random offset to all intensities."""

    shift_range: float = Field(default=0.5, ge=0.0, le=10.0)
    """Offset drawn uniformly in +-shift_range (z-score units)."""

    contrast_prob: float = Field(default=0.8, ge=0.0, le=1.0)
    """Probability of a gamma contrast change (MONAI AdjustContrast: min-max scaled, ^gamma)."""

    contrast_gamma: tuple[float, float] = (0.5, 1.5)
    """Gamma range (low, high) for the contrast change; 1 keeps the contrast."""

    bias_field_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    """Probability of a smooth multiplicative bias field (MRI coil inhomogeneity)."""

    bias_field_coeff: tuple[float, float] = (0.0, 0.1)
    """Range of the Legendre polynomial coefficients of log(bias); 0.1 is a mild field."""

    bias_field_order: int = Field(default=3, ge=1, le=6)
    """Polynomial order of the bias field; higher orders give less smooth fields."""

    noise_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    """Probability of additive Gaussian noise."""

    noise_std: tuple[float, float] = (0.0, 0.1)
    """Range of the noise standard deviation (z-score units)."""

    blur_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    """Probability of a Gaussian blur (lower resolution acquisitions)."""

    blur_sigma: tuple[float, float] = (0.5, 1.0)
    """Range of the blur sigma (voxels of the output view)."""

    gamma_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    """Probability of an MRI-style gamma that keeps mean and std (nnU-Net habit)."""

    gamma_range: tuple[float, float] = (0.7, 1.5)
    """Gamma range (low, high) of that stats-preserving gamma."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where views are made: `auto` = the training device; `cpu` forces the CPU path."""

    @model_validator(mode="after")
    def _ranges(self) -> ViewsSpec:
        pairs = {
            "contrast_gamma": (self.contrast_gamma, 0.01, 10.0),
            "bias_field_coeff": (self.bias_field_coeff, -1.0, 1.0),
            "noise_std": (self.noise_std, 0.0, 10.0),
            "blur_sigma": (self.blur_sigma, 0.0, 10.0),
            "gamma_range": (self.gamma_range, 0.01, 10.0),
        }
        for name, ((low, high), floor, ceil) in pairs.items():
            if not floor <= low <= high <= ceil:
                raise ValueError(
                    f"`{name}` must be (low, high) with {floor} <= low <= high <= {ceil}, "
                    f"got ({low}, {high})"
                )
        if any(not 0.0 <= r <= 180.0 for r in self.rotate_range_deg):
            raise ValueError("`rotate_range_deg` entries must lie in [0, 180] degrees")
        return self

    def check_patch(self, patch_size: int) -> None:
        """Raise ValueError unless crops of `crop_min` fit in patches of `patch_size`."""
        if self.crop_min > patch_size:
            raise ValueError(
                f"views.crop_min ({self.crop_min}) exceeds data.patch_size ({patch_size}): "
                "lower crop_min or raise patch_size"
            )

    def recipe(self) -> ViewRecipe:
        """The plain dataclass the torch-only view code takes."""
        fields = {k: v for k, v in self.model_dump().items() if k != "device"}
        return ViewRecipe(**fields)
