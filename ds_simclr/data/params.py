"""Random draws for patches and views: a pure function of (seed, epoch, slot, stream).

Each random step owns a generator seeded from (seed, epoch, slot, stream, step id), so a view never
depends on the rank, the worker count, the order samples are made in, or on whether another step is
switched on. Draws happen on the CPU with torch's generator; the result is a small dataclass that can
be replayed on any device. Torch-only on purpose (see `recipe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ds_simclr.data.recipe import ViewRecipe

_MASK64 = (1 << 64) - 1
PATCH_STREAM = 0
"""Stream id of the patch position; views use streams 1 and 2."""

_CROP, _FLIP, _ROTATE, _SHIFT, _CONTRAST, _BIAS, _NOISE, _BLUR, _GAMMA = range(9)


def derive_seed(*keys: int) -> int:
    """Mix integer keys into a 63-bit seed (splitmix64 finaliser); distinct keys give distant seeds."""
    h = 0x9E3779B97F4A7C15
    for key in keys:
        h = (h ^ (key & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both included)."""
    return int(torch.randint(low, high + 1, (), generator=g))


def draw_patch_start(volume_shape: tuple[int, ...], patch_size: int, key: tuple[int, ...]) -> tuple[int, int, int]:
    """Corner of a patch in volume voxels; negative or overhanging when the volume is smaller (padded)."""
    g = _generator(*key, PATCH_STREAM)
    return tuple(_randint(g, min(0, d - patch_size), max(0, d - patch_size)) for d in volume_shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class ViewParams:
    """Everything random about one view; replaying it gives the same view on any device."""

    crop_start: tuple[int, int, int]
    crop_size: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    angles: tuple[float, float, float]
    """Rotation (radians) about array axes 0, 1, 2; all zero when no rotation is drawn."""
    shift: float
    contrast_gamma: float
    """1.0 means no contrast change."""
    bias_coeffs: tuple[float, ...]
    """Empty means no bias field."""
    noise_std: float
    noise_seed: int
    blur_sigma: float
    gamma: float
    """Stats-preserving gamma; 1.0 means none."""

    @property
    def rotates(self) -> bool:
        return any(a != 0.0 for a in self.angles)


def bias_terms(order: int) -> list[tuple[int, int, int]]:
    """Legendre degree triples (i, j, k) with i + j + k <= order, in a fixed order."""
    return [(i, j, k) for i in range(order + 1) for j in range(order + 1 - i) for k in range(order + 1 - i - j)]


def draw_view(recipe: ViewRecipe, patch_size: int, key: tuple[int, ...]) -> ViewParams:
    """Draw one view's parameters. `key` = (seed, epoch, slot, view) with view in {1, 2}."""
    g = _generator(*key, _CROP)
    low = min(recipe.crop_min, patch_size)
    size = tuple(_randint(g, low, patch_size) for _ in range(3))
    start = tuple(_randint(g, 0, patch_size - s) for s in size)

    g = _generator(*key, _FLIP)
    if recipe.flip_all_axes:
        flip = tuple(_uniform(g, 0, 1) < recipe.flip_prob for _ in range(3))
    else:
        on, axis = _uniform(g, 0, 1) < recipe.flip_prob, _randint(g, 0, 2)
        flip = tuple(on and a == axis for a in range(3))

    g = _generator(*key, _ROTATE)
    on = _uniform(g, 0, 1) < recipe.rotate_prob
    angles = tuple(math.radians(_uniform(g, -r, r)) if on and r > 0 else 0.0 for r in recipe.rotate_range_deg)

    g = _generator(*key, _SHIFT)
    on = _uniform(g, 0, 1) < recipe.shift_prob
    shift = _uniform(g, -recipe.shift_range, recipe.shift_range) if on else 0.0

    g = _generator(*key, _CONTRAST)
    on = _uniform(g, 0, 1) < recipe.contrast_prob
    contrast = _uniform(g, *recipe.contrast_gamma) if on else 1.0

    g = _generator(*key, _BIAS)
    on = _uniform(g, 0, 1) < recipe.bias_field_prob
    coeffs = tuple(_uniform(g, *recipe.bias_field_coeff) for _ in bias_terms(recipe.bias_field_order)) if on else ()

    g = _generator(*key, _NOISE)
    on = _uniform(g, 0, 1) < recipe.noise_prob
    noise_std = _uniform(g, *recipe.noise_std) if on else 0.0
    noise_seed = _randint(g, 0, 2**62)

    g = _generator(*key, _BLUR)
    on = _uniform(g, 0, 1) < recipe.blur_prob
    blur = _uniform(g, *recipe.blur_sigma) if on else 0.0

    g = _generator(*key, _GAMMA)
    on = _uniform(g, 0, 1) < recipe.gamma_prob
    gamma = _uniform(g, *recipe.gamma_range) if on else 1.0

    return ViewParams(start, size, flip, angles, shift, contrast, coeffs, noise_std, noise_seed, blur, gamma)  # type: ignore[arg-type]
