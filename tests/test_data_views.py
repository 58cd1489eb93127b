"""Views: both spatial paths against MONAI on the same parameters, against each other, and replayable."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from data_helpers import real_volume
from helpers import REPO
from monai.transforms import (
    AdjustContrast,
    Flip,
    Resize,
    Rotate,
    ShiftIntensity,
    SpatialCrop,
)

from ds_simclr.data.augment import cpu_spatial, fused_spatial, intensity, make_views
from ds_simclr.data.options import ViewsSpec
from ds_simclr.data.params import ViewParams, draw_view
from ds_simclr.data.recipe import ViewRecipe
from ds_simclr.data.store import cut_patch

P, S = 40, 32


@pytest.fixture(scope="module")
def patches() -> torch.Tensor:
    """Real MRI patches (nibabel's T1, upsampled to ~1 mm and z-scored), (4,1,P,P,P)."""
    vol = torch.from_numpy(real_volume("anatomical.nii"))[None, None]
    vol = torch.nn.functional.interpolate(vol, scale_factor=2.0, mode="trilinear")[0, 0].numpy()
    vol = (vol - vol.mean()) / vol.std()
    starts = [(0, 0, 0), (10, 20, 5), (20, 30, 8), (5, 40, 2)]
    return torch.from_numpy(np.stack([cut_patch(vol, s, P, float(vol.min())) for s in starts])[:, None])


def _recipe(**kw: object) -> ViewRecipe:
    return dataclasses.replace(ViewsSpec(output_size=S, crop_min=16).recipe(), **kw)


def _monai_spatial(patch: torch.Tensor, p: ViewParams) -> torch.Tensor:
    x = SpatialCrop(roi_start=p.crop_start, roi_end=[a + b for a, b in zip(p.crop_start, p.crop_size)])(patch)
    x = Resize((S, S, S), mode="trilinear")(x)
    for axis in range(3):
        if p.flip[axis]:
            x = Flip(spatial_axis=axis)(x)
    if p.rotates:
        x = Rotate(angle=p.angles, mode="bilinear", padding_mode="border")(x)
    return torch.as_tensor(x)


def _params(recipe: ViewRecipe, n: int, seed: int = 0) -> list[ViewParams]:
    return [draw_view(recipe, P, (seed, 0, slot, 1)) for slot in range(n)]


@pytest.mark.parametrize("rotate_range", [(45.0, 0.0, 0.0), (20.0, 15.0, 10.0)])
def test_cpu_path_equals_monai(patches: torch.Tensor, rotate_range: tuple[float, float, float]) -> None:
    recipe = _recipe(flip_prob=0.7, rotate_prob=0.7, rotate_range_deg=rotate_range)
    params = _params(recipe, 4)
    assert any(p.rotates for p in params) and any(not p.rotates for p in params)
    ours = cpu_spatial(patches, params, S)
    for i, p in enumerate(params):
        torch.testing.assert_close(ours[i], _monai_spatial(patches[i], p), atol=1e-4, rtol=1e-4)


def test_fused_path_equals_monai_without_rotation(patches: torch.Tensor) -> None:
    params = _params(_recipe(flip_prob=1.0, rotate_prob=0.0, flip_all_axes=True), 4)
    ours = fused_spatial(patches, params, S)
    for i, p in enumerate(params):
        torch.testing.assert_close(ours[i], _monai_spatial(patches[i], p), atol=1e-4, rtol=1e-4)


def test_fused_path_close_to_monai_with_rotation(patches: torch.Tensor) -> None:
    params = _params(_recipe(rotate_prob=1.0, rotate_range_deg=(45.0, 20.0, 0.0)), 4)
    fused, cpu = fused_spatial(patches, params, S), cpu_spatial(patches, params, S)
    for i, p in enumerate(params):
        ref = _monai_spatial(patches[i], p)
        # one resampling instead of two: differences are interpolation-sized, far below the signal
        assert (fused[i] - ref).abs().mean() < 0.05 * ref.std()
        assert (fused[i] - cpu[i]).abs().mean() < 0.05 * ref.std()
        assert torch.corrcoef(torch.stack([fused[i].flatten(), ref.flatten()]))[0, 1] > 0.99


def test_intensity_equals_monai(patches: torch.Tensor) -> None:
    recipe = _recipe(shift_prob=1.0, contrast_prob=1.0)
    params = _params(recipe, 4)
    x = cpu_spatial(patches, params, S)
    ours = intensity(x.clone(), params, recipe)
    for i, p in enumerate(params):
        ref = AdjustContrast(gamma=p.contrast_gamma)(ShiftIntensity(offset=p.shift)(x[i]))
        torch.testing.assert_close(ours[i], torch.as_tensor(ref), atol=1e-4, rtol=1e-4)


def test_draws_depend_only_on_their_key() -> None:
    recipe = _recipe()
    a = draw_view(recipe, P, (3, 1, 17, 1))
    assert a == draw_view(recipe, P, (3, 1, 17, 1))
    assert a != draw_view(recipe, P, (3, 1, 17, 2))
    assert a != draw_view(recipe, P, (3, 1, 18, 1))
    assert a != draw_view(recipe, P, (3, 2, 17, 1))
    # switching another step on does not move this step's draws (each step owns its generator)
    b = draw_view(_recipe(noise_prob=1.0, blur_prob=1.0), P, (3, 1, 17, 1))
    assert (b.crop_start, b.crop_size, b.flip, b.angles, b.shift) == (a.crop_start, a.crop_size, a.flip, a.angles, a.shift)
    for p in _params(recipe, 50):
        assert all(16 <= s <= P and 0 <= c <= P - s for s, c in zip(p.crop_size, p.crop_start))
        assert sum(p.flip) <= 1 and abs(p.angles[0]) <= math.radians(45) and p.angles[1:] == (0.0, 0.0)


def test_recipe_probabilities_are_respected() -> None:
    params = _params(_recipe(), 400)
    assert 0.4 < np.mean([any(p.flip) for p in params]) < 0.6
    assert 0.4 < np.mean([p.rotates for p in params]) < 0.6
    assert 0.7 < np.mean([p.shift != 0 for p in params]) < 0.9
    assert all(0.5 <= p.contrast_gamma <= 1.5 for p in params)
    assert not any(p.bias_coeffs or p.noise_std or p.blur_sigma or p.gamma != 1.0 for p in params)


def test_views_are_replayable_and_batch_independent(patches: torch.Tensor) -> None:
    recipe = _recipe(noise_prob=1.0, bias_field_prob=1.0)
    params = _params(recipe, 4)
    whole = make_views(patches, params, recipe)
    again = make_views(patches, params, recipe)
    torch.testing.assert_close(whole, again, atol=0, rtol=0)
    halves = torch.cat([make_views(patches[:2], params[:2], recipe), make_views(patches[2:], params[2:], recipe)])
    torch.testing.assert_close(whole, halves, atol=0, rtol=0)
    assert whole.shape == (4, 1, S, S, S) and whole.dtype == torch.float32


def test_mri_physics_steps(patches: torch.Tensor) -> None:
    base = ViewParams((0, 0, 0), (S, S, S), (False,) * 3, (0.0,) * 3, 0.0, 1.0, (), 0.0, 7, 0.0, 1.0)
    x = cpu_spatial(patches[:1], [base], S)
    recipe = _recipe()
    torch.testing.assert_close(intensity(x.clone(), [base], recipe), x)
    zero_bias = dataclasses.replace(base, bias_coeffs=(0.0,) * 20)
    torch.testing.assert_close(intensity(x.clone(), [zero_bias], recipe), x)
    bias = dataclasses.replace(base, bias_coeffs=(0.3,) + (0.0,) * 19)
    torch.testing.assert_close(intensity(x.clone(), [bias], recipe), x * math.exp(0.3))
    noisy = intensity(x.clone(), [dataclasses.replace(base, noise_std=0.5)], recipe)
    assert abs(float((noisy - x).std()) - 0.5) < 0.02
    blurred = intensity(x.clone(), [dataclasses.replace(base, blur_sigma=1.5)], recipe)
    assert float(blurred.std()) < float(x.std()) and abs(float(blurred.mean() - x.mean())) < 0.05
    gamma = intensity(x.clone(), [dataclasses.replace(base, gamma=1.4)], recipe)
    assert float(gamma.mean()) == pytest.approx(float(x.mean()), abs=1e-4)
    assert float(gamma.std()) == pytest.approx(float(x.std()), rel=1e-3)
    assert not torch.allclose(gamma, x, atol=1e-2)


def test_spec_checks() -> None:
    with pytest.raises(ValueError, match="contrast_gamma"):
        ViewsSpec(contrast_gamma=(1.5, 0.5))
    with pytest.raises(ValueError):
        ViewsSpec(output_size=4096)
    with pytest.raises(ValueError, match="crop_min"):
        ViewsSpec(crop_min=100).check_patch(64)
    assert ViewsSpec().recipe() == ViewRecipe()


def test_device_modules_import_only_torch() -> None:
    """benchmarks/gpu_views.py must run where only torch is installed."""
    import subprocess
    import sys

    code = (
        "import sys, ds_simclr.data.augment, ds_simclr.data.params, ds_simclr.data.recipe\n"
        "bad = [m for m in ('pydantic', 'monai', 'SimpleITK', 'nibabel', 'blosc2') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(REPO))
