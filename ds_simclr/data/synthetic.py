"""Tiny synthetic head-like volumes at any count, for scale tests and `benchmarks/scale.py`.

Each volume is a noisy ellipsoid (a bright "head" on a zero background) of a few thousand voxels
with its own size, position and intensity, so preprocessing (crop, z-score, resample) does real work
and every volume differs. Not MRI: use the demo collection for anything about image content.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ds_simclr.data.manifest import collection_json
from ds_simclr.data.store import write_index, write_volume
from ds_simclr.atomic import write_atomic

PER_FOLDER = 1000
"""Volumes per subfolder of a synthetic collection (keeps folders small at 100k volumes)."""


def tiny_volume(k: int, edge: int = 12, seed: int = 0) -> np.ndarray:
    """Volume number `k`: (edge, edge, edge) float32, zero outside a noisy ellipsoid."""
    rng = np.random.default_rng([seed, k])
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, edge)] * 3, indexing="ij"))
    radii = rng.uniform(0.5, 0.95, size=(3, 1, 1, 1))
    centre = rng.uniform(-0.1, 0.1, size=(3, 1, 1, 1))
    inside = (((grid - centre) / radii) ** 2).sum(0) <= 1.0
    values = rng.normal(100.0 + 20.0 * rng.random(), 15.0, size=inside.shape)
    return np.where(inside, np.abs(values), 0.0).astype(np.float32)


def _rows(n: int) -> Iterator[tuple[str, str, str, str, str, str]]:
    for k in range(n):
        rel = f"volumes/{k // PER_FOLDER:04d}/v{k:06d}.nii"
        yield ("Dataset001_Synthetic", f"sub-{k:06d}", "ses-1", f"v{k:06d}.nii", rel, "T1w")


def write_tiny_collection(root: Path, n: int, *, edge: int = 12, spacing: float = 2.0, seed: int = 0) -> Path:
    """`n` tiny NIfTI volumes (voxel size `spacing` mm) under `root/volumes/` and their pretrain_data.json."""
    import nibabel as nib

    root = Path(root)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    for k, (*_, rel, _modality) in enumerate(_rows(n)):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(tiny_volume(k, edge, seed), affine), str(path))
    manifest = root / "pretrain_data.json"
    write_atomic(manifest, collection_json("Synthetic", _rows(n)))
    return manifest


def write_tiny_store(store_dir: Path, n: int, *, edge: int = 12, seed: int = 0) -> Path:
    """A complete store of `n` tiny volumes written directly (no preprocessing); returns the folder."""
    ids, shapes, pads = [], [], []
    for k in range(n):
        uid = f"Synthetic__v{k:06d}"
        vol = tiny_volume(k, edge, seed)
        write_volume(store_dir, uid, vol)
        ids.append(uid)
        shapes.append(vol.shape)
        pads.append(0.0)
    write_index(store_dir, ids, shapes, pads, ["T1w"] * n)
    return Path(store_dir)
