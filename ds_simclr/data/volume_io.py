"""Read one MRI volume into SimpleITK; NIfTI goes through nibabel.

Two reasons: SimpleITK picks the qform when qform and sform disagree (seen in real templates; the
data lands in the wrong place), and ITK's NIfTI reader silently turns NaN voxels into zeros, so a
broken image would pass the NaN check. nibabel follows the sform and keeps NaNs; its array and
affine go to SimpleITK by hand (native byte order, float32, RAS -> LPS). Other formats use SimpleITK.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

_NIFTI = (".nii", ".nii.gz")


class NotAVolume(ValueError):
    """The file holds something other than one 3D volume (2D, several volumes)."""


def headers_disagree(path: Path) -> bool:
    """True when a NIfTI file has both qform and sform set and they differ."""
    import nibabel as nib

    header = nib.load(str(path)).header
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qform is None or sform is None or not qcode or not scode:
        return False
    return not np.allclose(qform, sform, atol=1e-3)


def nifti_via_nibabel(path: Path) -> sitk.Image:
    """Array + affine from nibabel (its sform-first choice) handed to SimpleITK."""
    import nibabel as nib

    nii = nib.load(str(path))
    data = np.asarray(nii.dataobj, dtype=np.float32)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 2:
        raise NotAVolume(f"not a 3D image ({data.ndim}D, shape {list(data.shape)})")
    affine = nii.affine
    lin = affine[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    flip = np.diag([-1.0, -1.0, 1.0])
    direction = flip @ (lin / spacing)
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    img.SetSpacing(spacing.tolist())
    img.SetDirection(direction.flatten().tolist())
    img.SetOrigin((flip @ affine[:3, 3]).tolist())
    return img


def read_volume(path: Path) -> tuple[sitk.Image, str]:
    """The image and which reader produced it ("nibabel", "nibabel-sform" when the headers disagree, "sitk")."""
    path = Path(path)
    if path.name.endswith(_NIFTI):
        return nifti_via_nibabel(path), "nibabel-sform" if headers_disagree(path) else "nibabel"
    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3 or min(img.GetSize()) < 2:
        raise NotAVolume(f"not a 3D image ({img.GetDimension()}D, size {list(img.GetSize())})")
    return img, "sitk"
