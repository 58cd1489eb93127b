"""Sharded preprocessing on a real SLURM (2 simulated hosts): slurm/preprocess_array.sbatch as a job
array of 2 shards on both hosts, then its dependent index job, gives the store that one process gives,
image by image."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO
from tests.cluster.test_launch_slurm import job_env

from ds_simclr.data.preprocess import preprocess
from ds_simclr.data.store import PatchStore, sidecar_file, volume_file
from ds_simclr.data.synthetic import tiny_volume, write_tiny_collection

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _manifest(root: Path) -> Path:
    """12 tiny volumes, one of them thick-sliced (0.5 x 0.5 x 3 mm) and one a single slice (skipped)."""
    manifest = write_tiny_collection(root, 12)
    volumes = sorted((root / "volumes").rglob("*.nii"))
    nib.save(nib.Nifti1Image(tiny_volume(3), np.diag([0.5, 0.5, 3.0, 1.0])), str(volumes[3]))
    nib.save(nib.Nifti1Image(tiny_volume(7)[:, :, 5:6], np.eye(4)), str(volumes[7]))
    return manifest


def test_array_of_two_shards_then_the_index_job_equals_one_process(slurm_cluster, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "raw")
    single = tmp_path / "single"
    expected = preprocess(manifest, single, progress=False)
    assert len(expected.skipped) == 1 and expected.store_size == 11

    shared, env = tmp_path / "shared", job_env(tmp_path)
    array = slurm_cluster.sbatch("--array=0-1", "--exclusive", "--cpus-per-task=1", "-o", str(tmp_path / "shard-%a.out"),
                                 "slurm/preprocess_array.sbatch", str(manifest), str(shared), cwd=REPO, env=env)
    index = slurm_cluster.sbatch(f"--dependency=afterany:{array}", "--cpus-per-task=1", "-o", str(tmp_path / "index.out"),
                                 "slurm/preprocess_array.sbatch", str(manifest), str(shared), cwd=REPO, env=env)
    logs = lambda: "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.out")))  # noqa: E731
    # every task and the index step skip the one-slice image: exit status 1, which SLURM calls FAILED
    assert slurm_cluster.wait(index, 240) == ("FAILED", "1:0"), logs()

    shards = [json.loads((shared / "shards" / f"{k}-of-2.json").read_text()) for k in range(2)]
    assert sorted(s["host"] for s in shards) == ["h1", "h2"], logs()  # one shared OUT, written from both hosts
    shares = [set(s["processed"]) | {skip["id"] for skip in s["skipped"]} for s in shards]
    assert not shares[0] & shares[1] and len(shares[0]) + len(shares[1]) == 12
    report = json.loads((shared / "report.json").read_text())
    assert report["processed"] == [] and len(report["reused"]) == 11  # the index step redid nothing
    assert report == json.loads((single / "report.json").read_text()) | {"processed": [], "reused": report["reused"]}

    ours, theirs = PatchStore(shared), PatchStore(single)
    assert [ours.id(i) for i in range(len(ours))] == [theirs.id(i) for i in range(len(theirs))]
    for i in range(len(ours)):
        uid = ours.id(i)
        assert (shared / volume_file(uid)).read_bytes() == (single / volume_file(uid)).read_bytes(), uid
        assert json.loads((shared / sidecar_file(uid)).read_text()) == json.loads((single / sidecar_file(uid)).read_text())
        assert ours.pad_value(i) == theirs.pad_value(i) and ours.shape(i) == theirs.shape(i)
    assert not [p for p in shared.rglob(".*") if ".tmp" in p.name]  # no temporary file left behind
