"""Resample an image to the plan's spacing, the way nnU-Net does for thick slices.

When the largest voxel spacing is more than 3x the smallest (`ANISOTROPY_THRESHOLD`, nnU-Net's
`ANISO_THRESHOLD`) and one axis alone has it (the slice axis), the image is resampled in-plane with
a cubic B-spline and across slices with nearest neighbour, so a 0.5 x 0.5 x 5 mm scan is not
B-spline upsampled tenfold through its slices (Isensee et al., nnU-Net, Nature Methods 2021).
Otherwise a cubic B-spline on all axes. The new grid is centred on the old one's extent (as
nnU-Net's and scikit-image's `resize` do), so no slice at either end falls outside the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

ANISOTROPY_THRESHOLD = 3.0
SAME_SPACING_RTOL = 1e-3
"""Spacings this close (relative) count as equal: the image is not resampled along that grid."""


def slice_axis(spacing: tuple[float, ...]) -> int | None:
    """Index (x=0, y=1, z=2) of the one coarse axis when max spacing > 3x min spacing, else None.

    None too when two axes share the largest spacing (e.g. 0.24 x 1.25 x 1.25 mm), as in nnU-Net.
    """
    s = np.asarray(spacing, dtype=np.float64)
    if s.max() <= ANISOTROPY_THRESHOLD * s.min():
        return None
    coarse = np.flatnonzero(np.isclose(s, s.max(), rtol=SAME_SPACING_RTOL, atol=0.0))
    return int(coarse[0]) if coarse.size == 1 else None


def resample_onto(img: sitk.Image, spacing: tuple[float, ...], interpolator: int, default: float) -> sitk.Image:
    """`img` on a grid of `spacing` (mm) over the same extent (centred), same direction, float32.

    Returns `img` itself when its spacing already equals `spacing`. Points outside the data get `default`.
    """
    old = np.asarray(img.GetSpacing(), dtype=np.float64)
    new = np.asarray(spacing, dtype=np.float64)
    if np.allclose(old, new, rtol=SAME_SPACING_RTOL, atol=0.0):
        return img
    n = np.asarray(img.GetSize(), dtype=np.float64)
    size = np.maximum(1, np.rint(n * old / new)).astype(int)
    shift = (n - 1) * old / 2 - (size - 1) * new / 2  # mm along each index axis, first new voxel from first old one
    origin = np.asarray(img.GetOrigin()) + np.asarray(img.GetDirection()).reshape(3, 3) @ shift
    return sitk.Resample(
        img, size.tolist(), sitk.Transform(), interpolator, origin.tolist(), new.tolist(), img.GetDirection(), default, sitk.sitkFloat32
    )


def resample(img: sitk.Image, spacing: tuple[float, float, float], default: float) -> tuple[sitk.Image, dict[str, Any]]:
    """`img` at `spacing` (isotropic target) and what was done: `mode` ("none", "bspline3", or
    "bspline3 in-plane, nearest across slices" with `slice_axis` x|y|z), `from_spacing`."""
    old = tuple(img.GetSpacing())
    info: dict[str, Any] = {"from_spacing": list(old), "slice_axis": None}
    if np.allclose(old, spacing, rtol=SAME_SPACING_RTOL, atol=0.0):
        return img, info | {"mode": "none"}
    axis = slice_axis(old)
    if axis is None:
        return resample_onto(img, spacing, sitk.sitkBSpline, default), info | {"mode": "bspline3"}
    in_plane = list(spacing)
    in_plane[axis] = old[axis]
    img = resample_onto(img, in_plane, sitk.sitkBSpline, default)
    img = resample_onto(img, spacing, sitk.sitkNearestNeighbor, default)
    return img, info | {"mode": "bspline3 in-plane, nearest across slices", "slice_axis": "xyz"[axis]}
