"""Which voxels of an MRI volume are the subject: the mask used to crop and for z-score statistics.

- `nonzero` (nnSSL's and nnU-Net's rule): every voxel that is not exactly 0. Right for skull-stripped
  or masked images; on a raw head with a noisy background it keeps the whole field of view.
- `otsu`: a head mask for raw heads (after dipy's `median_otsu`): a ~2 mm copy of the volume (block
  means), median-filtered; the lower of two multi-level Otsu thresholds (air | dark | bright tissue);
  holes filled slice by slice along each axis (so dark skull, CSF and sinuses inside the scalp count
  as head); the largest connected component kept; the boundary then refined at full resolution
  (within one coarse voxel of it, a voxel is head when above the threshold).

Every function works on the (z, y, x) float32 array in place or with boolean masks (1 byte per
voxel); none builds per-voxel index arrays. SimpleITK is imported only where used (`Plan` imports
this module for `FOREGROUNDS`).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

Foreground = Literal["nonzero", "otsu"]
FOREGROUNDS: tuple[str, ...] = get_args(Foreground)
OTSU_BLOCK_MM = 2.0
"""Edge (mm) of the coarse voxels the Otsu mask is computed on."""


def zero_non_finite(array: np.ndarray) -> int:
    """Set NaN and +-inf voxels of `array` to 0 in place; returns how many there were."""
    bad = np.isfinite(array)
    np.logical_not(bad, out=bad)
    count = int(np.count_nonzero(bad))
    if count:
        np.copyto(array, 0, where=bad)
    return count


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) holding every True voxel of `mask`; None when empty.

    From per-axis projections (`any` over the other axes), so it costs no memory per voxel.
    """
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def foreground_mask(array: np.ndarray, spacing: tuple[float, float, float], method: str) -> tuple[np.ndarray, float | None]:
    """Boolean (z, y, x) mask of the subject and the intensity threshold used (None for `nonzero`).

    `spacing` is (x, y, z) in mm (SimpleITK order). Raises ValueError for an unknown method.
    """
    if method == "nonzero":
        return array != 0, None
    if method == "otsu":
        return otsu_head_mask(array, spacing)
    raise ValueError(f"unknown foreground {method!r} (one of {', '.join(FOREGROUNDS)})")


def _block_mean(array: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Mean over non-overlapping blocks of `factors` voxels (remainder voxels left out), float32."""
    out = array
    for axis, f in enumerate(factors):
        if f > 1:
            n = out.shape[axis] // f
            total = out[(slice(None),) * axis + (slice(0, n * f, f),)].astype(np.float32)
            for j in range(1, f):
                total += out[(slice(None),) * axis + (slice(j, n * f, f),)]
            out = total
    if out is array:
        return array
    out /= float(np.prod(factors))
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` (uint8 0/1) with every hole filled in every 2D slice along each of the three axes.

    A hole is a background region that does not reach the slice's edge; this fills 3D cavities too
    (enclosed in 3D means enclosed in each slice through it) and a skull or sinus inside a scalp ring.
    The slices of one axis are labelled in one 3D pass, stacked with empty planes between them that
    cut background connections from one slice to the next.
    """
    import SimpleITK as sitk

    mask = mask.copy()
    for axis in range(3):
        planes = np.moveaxis(mask, axis, 0)
        background = np.zeros((2 * planes.shape[0] - 1,) + planes.shape[1:], np.uint8)
        background[::2] = planes == 0
        labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(background), False))[::2]
        edge = np.unique(np.concatenate([labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]))
        planes[(labels != 0) & ~np.isin(labels, edge)] = 1
    return mask


def _grow(mask: np.ndarray, grow: bool) -> np.ndarray:
    """Dilation (`grow`) or erosion of a boolean mask by a 3 x 3 x 3 box (separable, one voxel)."""
    out = mask.copy()
    combine = np.logical_or if grow else np.logical_and
    for axis in range(out.ndim):
        a = np.moveaxis(out, axis, 0)
        b = a.copy()
        combine(a[1:], b[:-1], out=a[1:])
        combine(a[:-1], b[1:], out=a[:-1])
    return out


def _upsample(coarse: np.ndarray, factors: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour blow-up of a coarse mask to `shape` (remainder voxels repeat the last block)."""
    out = coarse
    for axis, (n, f, m) in enumerate(zip(shape, factors, coarse.shape)):
        out = np.repeat(out, [f] * (m - 1) + [n - (m - 1) * f], axis=axis)
    return out


def otsu_head_mask(array: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, float]:
    """The head mask described in the module docstring, and the threshold (image intensity).

    The threshold is the lower of two multi-level Otsu thresholds (air | dark tissue | bright
    tissue) of the median-filtered coarse volume, so dark tissue counts as head.
    """
    import SimpleITK as sitk

    zyx_spacing = np.asarray(spacing[::-1], dtype=np.float64)
    factors = tuple(int(min(n, max(1, np.ceil(OTSU_BLOCK_MM / s - 1e-6)))) for n, s in zip(array.shape, zyx_spacing))
    smooth = sitk.Median(sitk.GetImageFromArray(_block_mean(array, factors)), [1, 1, 1])
    values = sitk.GetArrayFromImage(smooth)
    low, high = np.percentile(values, [0.0, 99.9])
    if high > low:  # a few very bright voxels must not squeeze the tissue into Otsu's first bins
        smooth = sitk.Clamp(smooth, sitk.sitkFloat32, float(low), float(high))
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(2)
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(smooth)
    threshold = float(otsu.GetThresholds()[0])
    filled = _fill_holes((values > threshold).astype(np.uint8))
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(filled)), sortByObjectSize=True)
    head = sitk.GetArrayFromImage(components) == 1
    mask = array > threshold
    mask &= _upsample(_grow(head, True), factors, array.shape)
    mask |= _upsample(_grow(head, False), factors, array.shape)
    return mask, threshold
