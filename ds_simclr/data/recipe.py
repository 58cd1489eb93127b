"""Plain-number description of the view recipe, shared by the spec and the device code.

The device path (`params`, `augment`) and `benchmarks/gpu_views.py` import only this and torch, so a
GPU box with nothing but torch can run them; `options.ViewsSpec.recipe()` converts the validated spec.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViewRecipe:
    """Every number that defines how two views are drawn from a patch (units as in `ViewsSpec`)."""

    output_size: int = 160
    crop_min: int = 60
    flip_prob: float = 0.5
    flip_all_axes: bool = False
    rotate_prob: float = 0.5
    rotate_range_deg: tuple[float, float, float] = (45.0, 0.0, 0.0)
    shift_prob: float = 0.8
    shift_range: float = 0.5
    contrast_prob: float = 0.8
    contrast_gamma: tuple[float, float] = (0.5, 1.5)
    bias_field_prob: float = 0.0
    bias_field_coeff: tuple[float, float] = (0.0, 0.1)
    bias_field_order: int = 3
    noise_prob: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.1)
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    gamma_prob: float = 0.0
    gamma_range: tuple[float, float] = (0.7, 1.5)
