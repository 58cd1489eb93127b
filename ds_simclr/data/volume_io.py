"""Read one MRI volume as a float32 array + its grid; every assumption made on the way is noted.

NIfTI goes through nibabel, for two reasons: SimpleITK picks the qform when qform and sform
disagree (seen in real templates; the data lands in the wrong place), and ITK's NIfTI reader
silently turns NaN voxels into zeros. nibabel follows the sform and keeps NaNs; its array and affine
become our `Grid` by hand (RAS -> LPS). Other formats use SimpleITK.

What a reader has to assume or repair is returned with the volume (`Volume.assumptions`), in words,
so that the preprocessing report shows it with the image: a missing voxel size taken as 1 mm, a
spatial unit converted or assumed, a dropped singleton axis, direction cosines made orthonormal,
header fields nibabel fixed while loading (it would otherwise print them on stderr).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

_NIFTI = (".nii", ".nii.gz")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001}
_ORTHONORMAL_TOL = 1e-4


class NotAVolume(ValueError):
    """The file holds something other than one 3D volume (one slice, several volumes)."""


@dataclass(frozen=True)
class Grid:
    """Where the voxels are, in SimpleITK's terms: index order (x, y, z), LPS millimetres.

    `direction` is the 3 x 3 matrix of direction cosines (columns = index axes), row-major.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def image(self, array: np.ndarray, start: tuple[int, int, int] = (0, 0, 0)) -> sitk.Image:
        """A SimpleITK image of `array` ((z, y, x), copied), a block of this grid's voxels from index
        `start` (z, y, x)."""
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        offset = np.asarray(start[::-1], dtype=np.float64) * np.asarray(self.spacing)
        origin = np.asarray(self.origin) + np.asarray(self.direction).reshape(3, 3) @ offset
        img.SetSpacing(self.spacing)
        img.SetDirection(self.direction)
        img.SetOrigin(origin.tolist())
        return img


@dataclass
class Volume:
    """One volume as read: `array` is (z, y, x) float32, C-contiguous and writable; changing it in
    place never changes the file."""

    array: np.ndarray
    grid: Grid
    reader: str
    assumptions: list[str] = field(default_factory=list)


def headers_disagree(header: Any) -> bool:
    """True when a NIfTI header has both qform and sform set and they differ."""
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qform is None or sform is None or not qcode or not scode:
        return False
    return not np.allclose(qform, sform, atol=1e-3)


def as_3d(data: np.ndarray, notes: list[str]) -> np.ndarray:
    """`data` in file axis order with trailing singleton axes dropped (noted); NotAVolume otherwise.

    One slice is refused whichever axis holds it: (1, n, m), (n, 1, m), (n, m, 1), (n, m, 1, 1), (n, m).
    """
    shape = [int(n) for n in data.shape]
    while data.ndim > 3 and data.shape[-1] == 1:
        notes.append(f"dropped singleton axis {data.ndim} (file shape {shape})")
        data = data[..., 0]
    if data.ndim > 3:
        raise NotAVolume(f"{int(np.prod(data.shape[3:]))} volumes (shape {shape}), not one 3D volume")
    if data.size == 0:
        raise NotAVolume(f"no voxels (shape {shape})")
    if data.ndim < 3 or min(data.shape) < 2:
        raise NotAVolume(f"one slice, not a 3D volume (shape {shape})")
    return data


def make_grid(
    spacing: np.ndarray, direction: np.ndarray, origin: np.ndarray, notes: list[str]
) -> Grid:
    """A valid grid from what a header gives: a zero, negative or non-finite voxel size becomes 1 mm,
    non-orthonormal (or degenerate) direction cosines become the nearest orthonormal matrix; each noted."""
    spacing = np.array(spacing, dtype=np.float64)
    direction = np.array(direction, dtype=np.float64).reshape(3, 3)
    origin = np.array(origin, dtype=np.float64)
    bad = ~np.isfinite(spacing) | (spacing <= 0)
    if bad.any():
        axes = ", ".join("xyz"[i] for i in np.flatnonzero(bad))
        notes.append(f"voxel size missing or zero on axis {axes} ({_mm(spacing)}): taken as 1 mm")
        spacing[bad] = 1.0
    if not np.isfinite(direction).all():
        notes.append("direction cosines not finite: taken as the identity")
        direction = np.eye(3)
    deviation = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if deviation > _ORTHONORMAL_TOL:
        u, _, vt = np.linalg.svd(direction)
        direction = u @ vt
        notes.append(f"direction cosines not orthonormal (off by {deviation:.3g}): orientation fixed up to the nearest rotation")
    if not np.isfinite(origin).all():
        notes.append("origin not finite: taken as 0")
        origin = np.zeros(3)
    return Grid(tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.flatten().tolist()))


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def nibabel_messages() -> Iterator[list[str]]:
    """Collect what nibabel logs while loading (header fixes) instead of letting it print on stderr."""
    from nibabel.imageglobals import logger

    messages: list[str] = []
    saved, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [_Collect(messages)], False
    try:
        yield messages
    finally:
        logger.handlers, logger.propagate = saved, propagate


def _mm(values: Any) -> str:
    return " x ".join(f"{float(v):g}" for v in values) + " mm"


def read_nifti(path: Path) -> Volume:
    """A NIfTI volume through nibabel (its sform-first choice of affine), as a `Volume`."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    with nibabel_messages() as messages:
        nii = nib.load(str(path))
    with ImageOpener(str(path)) as fobj:
        raw = type(nii.header).from_fileobj(fobj, check=False)
    notes = [f"header fixed by nibabel: {m}" for m in messages if "should be non-zero;" not in m]  # said below, per axis
    data = as_3d(np.asarray(nii.dataobj, dtype=np.float32), notes)
    qcode, scode = int(raw["qform_code"]), int(raw["sform_code"])
    if qcode == 0 and scode == 0:
        notes.append("no qform or sform in the header: orientation taken as nibabel's default (LAS)")
    disagree = headers_disagree(raw)
    if disagree:
        notes.append("qform and sform disagree: the sform is used")
    if scode == 0:
        pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
        if (pixdim == 0).any():
            axes = ", ".join("xyz"[i] for i in np.flatnonzero(pixdim == 0))
            notes.append(f"voxel size missing (pixdim {_mm(pixdim)}) on axis {axes}: taken as 1 mm")
    affine = np.asarray(nii.affine, dtype=np.float64)
    unit = raw.get_xyzt_units()[0]
    scale = _UNIT_TO_MM.get(unit)
    if scale is None:
        notes.append(f"spatial unit {unit!r} in the header: taken as mm")
        scale = 1.0
    elif scale != 1.0:
        notes.append(f"spatial unit {unit!r} in the header: converted to mm")
    lin = affine[:3, :3] * scale
    spacing = np.linalg.norm(lin, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        direction = _RAS_TO_LPS @ (lin / np.where(spacing > 0, spacing, 1.0))
    grid = make_grid(spacing, direction, _RAS_TO_LPS @ (affine[:3, 3] * scale), notes)
    # nibabel's (i, j, k) is SimpleITK's (x, y, z), numpy order (z, y, x). nibabel hands out a private
    # buffer or a copy-on-write map of the file: writing into it never changes the file.
    array = data.T
    if not (array.flags.c_contiguous and array.flags.writeable):
        array = np.array(array, order="C")
    return Volume(array, grid, "nibabel-sform" if disagree else "nibabel", notes)


def read_sitk(path: Path) -> Volume:
    """Any other format SimpleITK reads, as a `Volume`."""
    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    notes: list[str] = []
    array = as_3d(sitk.GetArrayFromImage(img).transpose(), notes)  # file order (x, y, z, ...)
    dim = img.GetDimension()
    spacing, origin = img.GetSpacing()[:3], img.GetOrigin()[:3]
    direction = np.asarray(img.GetDirection()).reshape(dim, dim)[:3, :3]
    del img
    return Volume(np.ascontiguousarray(array.T), make_grid(np.asarray(spacing), direction, np.asarray(origin), notes), "sitk", notes)


def read_volume(path: Path) -> Volume:
    """The volume at `path` (NIfTI through nibabel, anything else through SimpleITK).

    Raises NotAVolume for one slice or several volumes; other exceptions mean an unreadable file.
    """
    path = Path(path)
    return read_nifti(path) if path.name.endswith(_NIFTI) else read_sitk(path)
