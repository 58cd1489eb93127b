"""Small real-MRI inputs for the data tests (volumes that nibabel ships; no download)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def real_volume(name: str = "anatomical.nii") -> np.ndarray:
    """A real low-resolution MRI volume as float32 (first volume of a 4D file)."""
    data = np.asarray(nib.load(str(NIBABEL_DATA / name)).dataobj, dtype=np.float32)
    return data[..., 0] if data.ndim == 4 else data


def write_manifest(path: Path, images: list[tuple[str, str, str]], **extra_image_keys: object) -> Path:
    """pretrain_data.json in nnSSL's layout with one subject/session per (name, image_path, modality)."""
    subjects = {}
    for k, (name, image_path, modality) in enumerate(images):
        subjects[f"sub-{k:02d}"] = {
            "subject_id": f"sub-{k:02d}",
            "subject_info": {"age": 30 + k},
            "sessions": {
                "ses-1": {
                    "session_id": "ses-1",
                    "session_info": None,
                    "images": [
                        {"name": name, "image_path": image_path, "modality": modality, "image_info": None, "associated_masks": None}
                        | extra_image_keys
                    ],
                }
            },
        }
    payload = {
        "collection_index": 745,
        "collection_name": "TestCollection",
        "datasets": {"Dataset001_Test": {"dataset_index": "Dataset001_Test", "name": "Test", "dataset_info": {"site": "x"}, "subjects": subjects}},
    }
    path.write_text(json.dumps(payload))
    return path


def real_store(root: Path) -> Path:
    """Preprocess nibabel's T1 and EPI volumes into a store under `root` (a few seconds)."""
    from ds_simclr.data.preprocess import preprocess

    vols = root / "raw"
    vols.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in ("anatomical.nii", "example4d.nii.gz"):
        img = nib.load(str(NIBABEL_DATA / name))
        out = vols / f"{name.split('.')[0]}.nii.gz"
        nib.save(nib.Nifti1Image(real_volume(name), img.affine), str(out))
        rows.append((out.name, str(out), "T1w" if name.startswith("anat") else "T2star"))
    manifest = write_manifest(root / "pretrain_data.json", rows)
    store = root / "store"
    preprocess(manifest, store, jobs=1, progress=False)
    return store
