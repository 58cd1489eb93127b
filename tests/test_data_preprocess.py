"""Preprocessing: real volumes in, bad files skipped with reasons, reruns reuse finished images."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from data_helpers import NIBABEL_DATA, real_volume, write_manifest

from ds_simclr.data.manifest import load_manifest
from ds_simclr.data.preprocess import preprocess
from ds_simclr.data.store import PatchStore, sidecar_file
from ds_simclr.data.volume_io import read_volume
from ds_simclr.errors import DataError

AFFINE_2MM = np.diag([2.0, 2.0, 2.0, 1.0])


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE_2MM) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mixed")
    t1 = real_volume("anatomical.nii")
    nan = t1.copy()
    nan[5:8, 5:8, 5:8] = np.nan
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b this is not a volume")
    rows = [
        ("t1.nii.gz", str(NIBABEL_DATA / "anatomical.nii"), "T1w"),
        ("epi.nii.gz", _save(root / "epi.nii.gz", real_volume("example4d.nii.gz")), "T2star"),
        ("corrupt.nii.gz", str(root / "corrupt.nii.gz"), "T1w"),
        ("nan.nii.gz", _save(root / "nan.nii.gz", nan), "T1w"),
        ("flat.nii.gz", _save(root / "flat.nii.gz", t1[:, :, 10].copy()), "T1w"),
        ("empty.nii.gz", _save(root / "empty.nii.gz", np.zeros((20, 20, 20), np.float32)), "T1w"),
        ("fourd.nii.gz", _save(root / "fourd.nii.gz", np.stack([t1, t1], axis=-1)), "T1w"),
    ]
    manifest = write_manifest(root / "pretrain_data.json", rows)
    return manifest, root / "store"


def test_bad_images_are_skipped_with_reasons(mixed: tuple[Path, Path]) -> None:
    manifest, store = mixed
    report = preprocess(manifest, store, jobs=2, progress=False)
    reasons = {s["id"].split("__")[-1]: s["reason"] for s in report.skipped}
    assert sorted(reasons) == ["corrupt", "empty", "flat", "fourd"]
    assert reasons["corrupt"].startswith("unreadable")
    assert reasons["flat"].startswith("one slice, not a 3D volume")
    assert reasons["fourd"].startswith("2 volumes")
    assert reasons["empty"].startswith("empty")
    assert len(report.processed) == 3
    nan_id = next(uid for uid in report.processed if uid.endswith("__nan"))
    assert json.loads((store / sidecar_file(nan_id)).read_text())["non_finite"] == 27
    on_disk = json.loads((store / "report.json").read_text())
    assert {s["id"] for s in on_disk["skipped"]} == {s["id"] for s in report.skipped}
    for name in ("plan.json", "fingerprint.json", "store.json", "pretrain_data.json"):
        assert (store / name).is_file()


def test_outputs_are_resampled_zscored_and_listed(mixed: tuple[Path, Path]) -> None:
    manifest, store = mixed
    preprocess(manifest, store, jobs=1, progress=False)
    finger = json.loads((store / "fingerprint.json").read_text())
    t1_id = next(k for k in finger if k.endswith("__t1"))
    assert finger[t1_id]["spacing"] == pytest.approx([2.0, 2.0, 2.0], abs=1e-4)
    ps = PatchStore(store)
    t1 = next(i for i in range(len(ps)) if ps.id(i) == t1_id)
    # 2 mm -> 1 mm doubles the (cropped) extent
    src = real_volume("anatomical.nii")
    box = np.argwhere(src != 0)
    extent = sorted((box.max(0) - box.min(0) + 1) * 2)
    assert sorted(ps.shape(t1)) == pytest.approx(extent, abs=1)
    with ps.volume(t1) as mapped:
        vol = np.asarray(mapped, dtype=np.float64)
    inside = vol[vol != np.float16(ps.pad_value(t1))]
    assert abs(inside.mean()) < 0.3 and 0.7 < inside.std() < 1.3
    out = load_manifest(store / "pretrain_data.json")
    assert {im.path for im in out} == {ps.path(i) for i in range(len(ps))}


def test_rerun_reuses_and_overwrite_redoes(mixed: tuple[Path, Path]) -> None:
    manifest, store = mixed
    preprocess(manifest, store, jobs=1, progress=False)
    report = preprocess(manifest, store, jobs=1, progress=False)
    assert len(report.reused) == 3 and not report.processed
    assert len(preprocess(manifest, store, jobs=1, progress=False, overwrite=True).processed) == 3


def test_other_plan_is_refused(mixed: tuple[Path, Path]) -> None:
    manifest, store = mixed
    preprocess(manifest, store, jobs=1, progress=False)
    with pytest.raises(DataError, match="another plan"):
        preprocess(manifest, store, jobs=1, progress=False, spacing=2.0)


def test_all_bad_is_an_error(tmp_path: Path) -> None:
    bad = _save(tmp_path / "empty.nii.gz", np.zeros((8, 8, 8), np.float32))
    manifest = write_manifest(tmp_path / "m.json", [("e.nii.gz", bad, "T1w")])
    with pytest.raises(DataError, match="no usable image"):
        preprocess(manifest, tmp_path / "out", progress=False)


def test_disagreeing_qform_and_sform_follow_the_sform(tmp_path: Path) -> None:
    data = real_volume("anatomical.nii")
    sform = np.diag([-2.0, 2.0, 2.0, 1.0])
    sform[:3, 3] = [40.0, -50.0, -20.0]
    img = nib.Nifti1Image(data, sform)
    img.set_qform(AFFINE_2MM, code=1)
    img.set_sform(sform, code=2)
    path = tmp_path / "both.nii.gz"
    nib.save(img, str(path))
    vol = read_volume(path)
    sitk_img = vol.grid.image(vol.array)
    assert vol.reader == "nibabel-sform" and "qform and sform disagree: the sform is used" in vol.assumptions
    ras = sform @ np.array([3, 4, 5, 1.0])
    lps = sitk_img.TransformIndexToPhysicalPoint((3, 4, 5))
    assert lps == pytest.approx((-ras[0], -ras[1], ras[2]))
    assert sitk_img.GetPixel(3, 4, 5) == pytest.approx(data[3, 4, 5])
    agree = tmp_path / "plain.nii.gz"
    _save(agree, data, sform)
    vol = read_volume(agree)
    ours, reference = vol.grid.image(vol.array), sitk.ReadImage(str(agree))
    assert ours.GetOrigin() == pytest.approx(reference.GetOrigin())
    assert ours.GetDirection() == pytest.approx(reference.GetDirection())
    assert ours.GetSpacing() == pytest.approx(reference.GetSpacing())
    assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(reference))


def test_zscore_uses_the_anatomy_mask(tmp_path: Path) -> None:
    data = real_volume("anatomical.nii")
    mask = np.zeros_like(data)
    mask[8:24, 10:30, 6:18] = 1
    image = _save(tmp_path / "t1.nii.gz", data)
    manifest = write_manifest(
        tmp_path / "m.json", [("t1.nii.gz", image, "T1w")], associated_masks={"anatomy_mask": _save(tmp_path / "mask.nii.gz", mask)}
    )
    preprocess(manifest, tmp_path / "out", progress=False)
    finger = next(iter(json.loads((tmp_path / "out" / "fingerprint.json").read_text()).values()))
    inside = data[mask > 0]
    assert finger["mean"] == pytest.approx(float(inside.mean()), rel=1e-4)
    assert finger["std"] == pytest.approx(float(inside.std()), rel=1e-4)
