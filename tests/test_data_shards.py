"""Sharded preprocessing (`data preprocess --shard K/N`), the report's per-image notes, the exit status,
and a worker process killed midway.

Shards write their images and a shard report, never the index; a plain run afterwards reuses them and
writes what a single process writes, byte for byte. (On a real SLURM: tests/cluster/test_preprocess_slurm.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO

from ds_simclr.cli import main
from ds_simclr.data.preprocess import WORKER_DIED
from ds_simclr.data.store import INDEX_NAME, sidecar_file
from ds_simclr.data.synthetic import tiny_volume, write_tiny_collection


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 tiny volumes; among them NaNs outside the head, thick slices, a header without orientation,
    and one single slice (skipped)."""
    root = tmp_path_factory.mktemp("shards")
    path = write_tiny_collection(root, 10)
    volumes = sorted((root / "volumes").rglob("*.nii"))
    nan = tiny_volume(1)
    nan[nan == 0] = np.nan
    _save(volumes[1], nan, np.diag([2.0, 2.0, 2.0, 1.0]))
    _save(volumes[2], tiny_volume(2), np.diag([0.5, 0.5, 3.0, 1.0]))
    header = nib.Nifti1Header()  # no qform, no sform, a zero voxel size on z
    header.set_data_shape((12, 12, 12))
    header.set_zooms((2.0, 2.0, 0.0))
    header.set_xyzt_units("mm")
    nib.save(nib.Nifti1Image(tiny_volume(3), None, header), str(volumes[3]))
    _save(volumes[4], tiny_volume(4)[:, :, 6:7], np.diag([2.0, 2.0, 2.0, 1.0]))
    return path


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return img


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ds_simclr.cli", "data", "preprocess", *args]


def _files(store: Path) -> dict[str, bytes]:
    """Every file of a store by relative path, but the index file (its name is per build) and shard reports."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and not p.name.startswith("index-") and p.parent.name != "shards"
    }


def test_shards_at_once_then_the_index_step_equal_one_process(manifest: Path, tmp_path: Path, capsys) -> None:
    single, shared = tmp_path / "single", tmp_path / "shared"
    assert main(["data", "preprocess", str(manifest), str(single)]) == 1  # one image skipped
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    procs = [subprocess.Popen(_cli(str(manifest), str(shared), "--shard", f"{k}/2"), env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (1, 0)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 1], outputs  # the one-slice image (number 4) is in shard 0's share
    assert "shard 0/2: 4 preprocessed, 0 reused, 1 skipped" in outputs[1]
    for name in (INDEX_NAME, "report.json", "fingerprint.json", "pretrain_data.json"):
        assert not (shared / name).exists()  # a shard never writes the index or the full report
    reports = [json.loads((shared / "shards" / f"{k}-of-2.json").read_text()) for k in (0, 1)]
    shares = [s["processed"] + s["reused"] + [skip["id"] for skip in s["skipped"]] for s in reports]
    assert sorted(shares[0] + shares[1]) == sorted(json.loads((single / "report.json").read_text())["processed"]
                                                    + [s["id"] for s in json.loads((single / "report.json").read_text())["skipped"]])
    assert len(shares[0]) == len(shares[1]) == 5 and not set(shares[0]) & set(shares[1])
    # a shard run again reuses its images; any order
    assert main(["data", "preprocess", str(manifest), str(shared), "--shard", "1/2"]) == 0
    assert "shard 1/2: 0 preprocessed, 5 reused, 0 skipped" in capsys.readouterr().out
    assert main(["data", "preprocess", str(manifest), str(shared)]) == 1
    assert "0 preprocessed, 9 reused, 1 skipped" in capsys.readouterr().out
    ours, theirs = _files(shared), _files(single)
    report, expected = json.loads(ours.pop("report.json")), json.loads(theirs.pop("report.json"))
    assert report == expected | {"processed": [], "reused": expected["processed"]}
    assert ours.keys() == theirs.keys() and len([k for k in ours if k.endswith(".npy")]) == 9
    assert [k for k in ours if ours[k] != theirs[k]] == ["store.json"]  # every image, sidecar, fingerprint, plan
    heads = [json.loads(files["store.json"]) for files in (ours, theirs)]
    assert heads[0] | {"index": None} == heads[1] | {"index": None}  # the index file's name is per build
    indexes = [np.load(store / head["index"]) for store, head in zip((shared, single), heads)]
    assert all(np.array_equal(indexes[0][key], indexes[1][key]) for key in indexes[1].files)
    assert not [p for p in shared.rglob("*") if ".tmp" in p.name]


def test_the_report_notes_what_was_repaired_assumed_or_resampled_per_image(manifest: Path, tmp_path: Path) -> None:
    assert main(["data", "preprocess", str(manifest), str(tmp_path / "s")]) == 1
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    notes = {uid.rsplit("__", 1)[-1]: note for uid, note in report["notes"].items()}
    assert notes.keys() == {"v000001", "v000002", "v000003"}  # the others are clean 2 mm volumes
    assert notes["v000001"] == {"non_finite": int((tiny_volume(1) == 0).sum())}
    assert notes["v000002"] == {"resampling": {"mode": "bspline3 in-plane, nearest across slices", "slice_axis": "z",
                                               "from_spacing": [0.5, 0.5, 3.0]}}
    assert "no qform or sform in the header: orientation taken as nibabel's default (LAS)" in notes["v000003"]["assumptions"]
    assert [s["reason"].split(" (")[0] for s in report["skipped"]] == ["one slice, not a 3D volume"]


def test_exit_status_and_bad_shards(manifest: Path, tmp_path: Path, capsys) -> None:
    good = write_tiny_collection(tmp_path / "good", 3)
    assert main(["data", "preprocess", str(good), str(tmp_path / "g")]) == 0  # every image processed
    assert main(["data", "preprocess", str(good), str(tmp_path / "g"), "--shard", "2/3"]) == 0
    capsys.readouterr()
    for bad in ("2/2", "1", "a/2", "-1/2", "0/0", "1/2/3"):
        assert main(["data", "preprocess", str(manifest), str(tmp_path / "bad"), "--shard", bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --shard: not a shard K/N"), err
    assert main(["data", "preprocess", str(tmp_path / "missing.json"), str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    # shards must share the plan: a second shard with another foreground is refused, so is its index step
    assert main(["data", "preprocess", str(good), str(tmp_path / "p"), "--shard", "0/2"]) == 0
    capsys.readouterr()
    assert main(["data", "preprocess", str(good), str(tmp_path / "p"), "--shard", "1/2", "--foreground", "otsu"]) == 2
    assert "another plan" in capsys.readouterr().err


def test_the_index_step_refuses_an_image_made_with_another_plan(tmp_path: Path, capsys) -> None:
    good = write_tiny_collection(tmp_path / "good", 3)
    assert main(["data", "preprocess", str(good), str(tmp_path / "s"), "--shard", "0/1"]) == 0
    uid = json.loads((tmp_path / "s" / "shards" / "0-of-1.json").read_text())["processed"][1]
    sidecar = tmp_path / "s" / sidecar_file(uid)
    sidecar.write_text(json.dumps(json.loads(sidecar.read_text()) | {"plan": "0123456789ab"}))  # e.g. a racing shard
    capsys.readouterr()
    assert main(["data", "preprocess", str(good), str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"image {uid} was preprocessed with another plan" in err and str(sidecar) in err
    assert not (tmp_path / "s" / INDEX_NAME).exists()


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_a_worker_killed_midway_skips_only_the_image_that_kills_it(tmp_path: Path) -> None:
    """What the OOM killer does to a worker: SIGKILL. Here every worker that has spent 2.5 s of CPU (only
    the large image takes that long: B-spline from 0.9 mm) is killed, in the pool and when the images in
    flight are tried again alone. The run goes on, skips that one image with the reason, reports, exits 1."""
    big = tmp_path / "big.nii"
    _save(big, np.random.default_rng(0).uniform(1, 2, (256, 256, 150)).astype(np.float32), np.diag([0.9, 0.9, 0.9, 1.0]))
    small = write_tiny_collection(tmp_path / "raw", 5)
    collection = json.loads(small.read_text())
    session = next(iter(next(iter(collection["datasets"].values()))["subjects"].values()))["sessions"]["ses-1"]
    session["images"].insert(0, {**session["images"][0], "name": "big.nii", "image_path": str(big)})
    small.write_text(json.dumps(collection))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(_cli(str(small), str(tmp_path / "s"), "-j", "2"), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = set()
    while proc.poll() is None:
        for child in _children(proc.pid):
            try:
                if child not in killed and _cpu_seconds(child) > 2.5:
                    os.kill(child, 9)
                    killed.add(child)
            except OSError:  # it ended meanwhile
                pass
        time.sleep(0.05)
    out = proc.stdout.read()
    assert proc.returncode == 1, out
    assert len(killed) == 2, out  # once in the pool, once alone
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert [(s["path"], s["reason"]) for s in report["skipped"]] == [(str(big), WORKER_DIED)]
    assert len(report["processed"]) == 5 and report["store_size"] == 5
