"""`ds_simclr data manifest`: BIDS datasets, plain folders and tables -> nnSSL's pretrain_data.json.

Trees are generated here with tiny synthetic volumes (12^3, a blob in noise), so every manifest can
also go through `data preprocess`. Bad input exits 2 with one line, and nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ds_simclr.cli import main
from ds_simclr.data.manifest import load_manifest


def _volume(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(12)] * 3, indexing="ij"))
    blob = np.exp(-((grid - 6.0) ** 2).sum(0) / 12.0) * 100
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image((blob + rng.normal(0, 1, blob.shape)).astype(np.float32), np.diag([1.5, 1.5, 1.5, 1])), str(path))


def _write(root: Path, files: dict[str, object]) -> Path:
    """Files under `root`: a Path content becomes a symbolic link to it, `.nii(.gz)` volumes, dicts JSON, strings text."""
    for k, (rel, content) in enumerate(files.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            path.symlink_to(content)
        elif rel.endswith((".nii", ".nii.gz")):
            _volume(path, k)
        elif isinstance(content, dict):
            path.write_text(json.dumps(content))
        else:
            path.write_text(str(content))
    return root


def bids_a(root: Path) -> Path:
    """Sessions for sub-01, none for sub-02; anat + func; sidecars at three levels; derivatives; .bidsignore."""
    return _write(
        root,
        {
            "dataset_description.json": {"Name": "Study A", "BIDSVersion": "1.9.0", "License": "CC0"},
            "participants.tsv": "participant_id\tage\tsex\tsite\nsub-01\t34\tF\t007\nsub-02\tn/a\tM\tnan\n",
            ".bidsignore": "extra_scans/\n*_old.nii.gz\n",
            "T1w.json": {"MagneticFieldStrength": 3, "Manufacturer": "Siemens"},
            "task-rest_bold.json": {"RepetitionTime": 2.0},
            "sub-01/sub-01_sessions.tsv": "session_id\tacq_time\nses-01\t2020-01-01\nses-02\t2021-01-01\n",
            "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz": None,
            "sub-01/ses-01/anat/sub-01_ses-01_T1w.json": {"Manufacturer": "GE"},
            "sub-01/ses-01/anat/sub-01_ses-01_T2w.nii.gz": None,
            "sub-01/ses-01/func/sub-01_ses-01_task-rest_bold.nii.gz": None,
            "sub-01/ses-02/sub-01_ses-02_run-2_T1w.json": {"EchoTime": 0.003},
            "sub-01/ses-02/anat/sub-01_ses-02_run-1_T1w.nii.gz": None,
            "sub-01/ses-02/anat/sub-01_ses-02_run-2_T1w.nii.gz": None,
            "sub-02/anat/sub-02_T1w.nii.gz": None,
            "sub-02/anat/sub-02_FLAIR.nii": None,
            "sub-02/anat/sub-02_T2w.nii.gz": Path("../../.git/annex/objects/not-fetched"),
            "sub-02/anat/sub-02_T1w_old.nii.gz": None,
            "sub-02/anat/sub-02_ses-01_T1w.nii.gz": None,
            "sub-02/dwi/sub-02_dwi.nii.gz": None,
            "extra_scans/sub-03_T1w.nii.gz": None,
            "derivatives/prep/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz": None,
            "sourcedata/sub-01/anat/sub-01_T1w.nii.gz": None,
            "code/convert.py": "print()",
            ".git/x_T1w.nii.gz": None,
        },
    )


def bids_b(root: Path) -> Path:
    """No sessions; a subject-level sidecar; the same subject label as dataset A."""
    return _write(
        root,
        {
            "dataset_description.json": {"Name": "Study B", "BIDSVersion": "1.8.0"},
            "sub-01/sub-01_T2w.json": {"Manufacturer": "Philips"},
            "sub-01/anat/sub-01_T1w.nii.gz": None,
            "sub-01/anat/sub-01_T2w.nii.gz": None,
            "sub-02/anat/sub-02_acq-fast_T2w.nii.gz": None,
        },
    )


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main(["data", "manifest", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _images(manifest: Path) -> dict[tuple[str, str, str, str], dict]:
    data = json.loads(manifest.read_text())
    return {
        (ds_key, subj_key, sess_key, img["name"]): img
        for ds_key, ds in data["datasets"].items()
        for subj_key, subj in ds["subjects"].items()
        for sess_key, sess in subj["sessions"].items()
        for img in sess["images"]
    }


def test_two_bids_datasets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = bids_a(tmp_path / "ds-a"), bids_b(tmp_path / "ds-b")
    manifest = tmp_path / "out" / "pretrain_data.json"
    code, out, err = _run(capsys, a, b, "-o", manifest)
    assert code == 0, err
    data = json.loads(manifest.read_text())
    assert data["collection_name"] == "out" and list(data["datasets"]) == ["ds-a", "ds-b"]
    dsa = data["datasets"]["ds-a"]
    assert dsa["name"] == "Study A" and dsa["dataset_info"]["License"] == "CC0"
    images = _images(manifest)
    assert sorted(images) == [
        ("ds-a", "sub-01", "ses-01", "sub-01_ses-01_T1w.nii.gz"),
        ("ds-a", "sub-01", "ses-01", "sub-01_ses-01_T2w.nii.gz"),
        ("ds-a", "sub-01", "ses-02", "sub-01_ses-02_run-1_T1w.nii.gz"),
        ("ds-a", "sub-01", "ses-02", "sub-01_ses-02_run-2_T1w.nii.gz"),
        ("ds-a", "sub-02", "ses-DEFAULT", "sub-02_FLAIR.nii"),
        ("ds-a", "sub-02", "ses-DEFAULT", "sub-02_T1w.nii.gz"),
        ("ds-b", "sub-01", "ses-DEFAULT", "sub-01_T1w.nii.gz"),
        ("ds-b", "sub-01", "ses-DEFAULT", "sub-01_T2w.nii.gz"),
        ("ds-b", "sub-02", "ses-DEFAULT", "sub-02_acq-fast_T2w.nii.gz"),
    ]
    # inheritance: root T1w.json, overridden by the image's own sidecar; a run-2 sidecar is not run-1's
    assert images[("ds-a", "sub-01", "ses-01", "sub-01_ses-01_T1w.nii.gz")]["image_info"] == {"MagneticFieldStrength": 3, "Manufacturer": "GE"}
    assert images[("ds-a", "sub-01", "ses-02", "sub-01_ses-02_run-1_T1w.nii.gz")]["image_info"] == {"MagneticFieldStrength": 3, "Manufacturer": "Siemens"}
    assert images[("ds-a", "sub-01", "ses-02", "sub-01_ses-02_run-2_T1w.nii.gz")]["image_info"] == {
        "MagneticFieldStrength": 3, "Manufacturer": "Siemens", "EchoTime": 0.003
    }
    assert images[("ds-a", "sub-01", "ses-01", "sub-01_ses-01_T2w.nii.gz")]["image_info"] is None
    assert images[("ds-b", "sub-01", "ses-DEFAULT", "sub-01_T2w.nii.gz")]["image_info"] == {"Manufacturer": "Philips"}
    assert images[("ds-b", "sub-02", "ses-DEFAULT", "sub-02_acq-fast_T2w.nii.gz")]["image_info"] is None
    assert {k[3]: v["modality"] for k, v in images.items()}["sub-02_FLAIR.nii"] == "FLAIR"
    assert dsa["subjects"]["sub-01"]["subject_info"] == {"age": 34, "sex": "F", "site": "007"}
    assert dsa["subjects"]["sub-02"]["subject_info"] == {"sex": "M", "site": "nan"}
    assert dsa["subjects"]["sub-01"]["sessions"]["ses-02"]["session_info"] == {"acq_time": "2021-01-01"}
    # relative to the manifest's folder; our loader resolves every path to the generated file
    assert images[("ds-b", "sub-01", "ses-DEFAULT", "sub-01_T1w.nii.gz")]["image_path"] == "../ds-b/sub-01/anat/sub-01_T1w.nii.gz"
    loaded = load_manifest(manifest)
    assert sorted(im.path.resolve() for im in loaded) == sorted(
        [a / "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz", a / "sub-01/ses-01/anat/sub-01_ses-01_T2w.nii.gz"]
        + [a / f"sub-01/ses-02/anat/sub-01_ses-02_run-{r}_T1w.nii.gz" for r in (1, 2)]
        + [a / "sub-02/anat/sub-02_T1w.nii.gz", a / "sub-02/anat/sub-02_FLAIR.nii"]
        + [b / "sub-01/anat/sub-01_T1w.nii.gz", b / "sub-01/anat/sub-01_T2w.nii.gz", b / "sub-02/anat/sub-02_acq-fast_T2w.nii.gz"]
    )
    assert len({im.uid for im in loaded}) == 9
    # one summary line per dataset; the invalid name is reported with its reason, the others counted
    lines = out.splitlines()
    assert lines[0] == (
        "ds-a (Study A): 2 subjects, 3 sessions, 6 images (FLAIR 1, T1w 4, T2w 1); ignored 1 bold images (not selected),"
        " 1 code/ folder, 1 derivatives/ folder, 1 dwi images (not selected), 2 paths in .bidsignore, 1 sourcedata/ folder; skipped 2"
    )
    assert lines[1] == "ds-b (Study B): 2 subjects, 2 sessions, 3 images (T1w 1, T2w 2)"
    assert err.count("skipped") == 2 and "sub-02/anat/sub-02_ses-01_T1w.nii.gz: not a BIDS path for a T1w image" in err
    assert "sub-02/anat/sub-02_T2w.nii.gz: a symbolic link to a missing file" in err


def test_bids_suffixes_choose_images_and_unknown_suffix_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = bids_a(tmp_path / "ds-a")
    manifest = tmp_path / "m.json"
    assert _run(capsys, a, "--suffix", "bold,FLAIR", "-o", manifest)[0] == 0
    images = _images(manifest)
    assert sorted(k[3] for k in images) == ["sub-01_ses-01_task-rest_bold.nii.gz", "sub-02_FLAIR.nii"]
    assert images[("ds-a", "sub-01", "ses-01", "sub-01_ses-01_task-rest_bold.nii.gz")]["image_info"] == {"RepetitionTime": 2.0}
    for bad, hint in (("T1", "did you mean T1w"), ("flair", "did you mean FLAIR")):
        code, out, err = _run(capsys, a, "--suffix", f"T2w,{bad}", "-o", tmp_path / "n.json")
        assert code == 2 and err.count("\n") == 1 and "--suffix" in err and hint in err
    assert not (tmp_path / "n.json").exists()


def test_root_variable(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    b = bids_b(tmp_path / "raw" / "ds-b")
    monkeypatch.setenv("nnssl_raw", str(tmp_path / "raw"))
    manifest = tmp_path / "elsewhere" / "pretrain_data.json"
    assert _run(capsys, b, "--root-var", "nnssl_raw", "-o", manifest, "--name", "Dataset001_B")[0] == 0
    data = json.loads(manifest.read_text())
    paths = sorted(img["image_path"] for img in _images(manifest).values())
    assert data["collection_name"] == "Dataset001_B"
    assert paths[0] == "$nnssl_raw/ds-b/sub-01/anat/sub-01_T1w.nii.gz"
    moved = tmp_path / "moved"
    (tmp_path / "raw").rename(moved)
    monkeypatch.setenv("nnssl_raw", str(moved))
    assert [im.path for im in load_manifest(manifest)][0] == moved / "ds-b/sub-01/anat/sub-01_T1w.nii.gz"
    monkeypatch.setenv("nnssl_raw", str(tmp_path / "elsewhere"))
    code, _, err = _run(capsys, moved / "ds-b", "--root-var", "nnssl_raw", "-o", tmp_path / "x.json")
    assert code == 2 and "is not under $nnssl_raw" in err and err.count("\n") == 1
    monkeypatch.delenv("nnssl_raw")
    code, _, err = _run(capsys, moved / "ds-b", "--root-var", "nnssl_raw", "-o", tmp_path / "x.json")
    assert code == 2 and "--root-var: environment variable nnssl_raw is not set" in err
    assert not (tmp_path / "x.json").exists()


def plain_folder(root: Path) -> Path:
    return _write(
        root,
        {
            "P001/visit1/t1.nii.gz": None,
            "P001/visit1/flair.nii.gz": None,
            "P001/visit2/t1.nii.gz": None,
            "P002/t1.nii.gz": None,
            "P002/flair.nii.gz": Path("/nonexistent/flair.nii.gz"),
            "P003/scan.nii.gz": None,
            "P003/notes.txt": "x",
        },
    )


FOLDER_REGEX = r"^(?P<subject>P\d+)/(?:(?P<session>visit\d+)/)?(?P<modality>t1|flair)\.nii\.gz$"


def test_plain_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = plain_folder(tmp_path / "scans")
    manifest = tmp_path / "scans" / "pretrain_data.json"
    code, out, err = _run(capsys, root, "--pattern", "**/*", "--regex", FOLDER_REGEX, "-o", root)  # a folder: FOLDER/pretrain_data.json
    assert code == 0, err
    assert sorted((k[1], k[2], k[3], v["modality"], v["image_path"]) for k, v in _images(manifest).items()) == [
        ("P001", "visit1", "flair.nii.gz", "flair", "P001/visit1/flair.nii.gz"),
        ("P001", "visit1", "t1.nii.gz", "t1", "P001/visit1/t1.nii.gz"),
        ("P001", "visit2", "t1.nii.gz", "t1", "P001/visit2/t1.nii.gz"),
        ("P002", "ses-DEFAULT", "t1.nii.gz", "t1", "P002/t1.nii.gz"),
    ]
    assert out.splitlines()[0] == "scans: 2 subjects, 3 sessions, 4 images (flair 1, t1 3); skipped 3"
    assert "P003/notes.txt: not an image file" in err and "P003/scan.nii.gz: does not match --regex" in err
    assert "P002/flair.nii.gz: a symbolic link to a missing file" in err
    assert len(load_manifest(manifest)) == 4
    # no modality group: --modality names them all; the glob narrows the files
    code, _, err = _run(
        capsys, root, "--pattern", "*/visit*/t1.nii.gz", "--regex", r"(?P<subject>P\d+)/(?P<session>visit\d)", "--modality", "T1w", "-o", manifest
    )
    assert code == 0 and err == ""
    assert sorted((k[1], k[2], v["modality"]) for k, v in _images(manifest).items()) == [("P001", "visit1", "T1w"), ("P001", "visit2", "T1w")]


def test_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "vols", {"a.nii.gz": None, "b.nii.gz": None, "c.nii": None})
    table = tmp_path / "lists" / "paths.csv"
    table.parent.mkdir()
    table.write_text(
        "image,participant,visit,contrast,age\n"
        "../vols/a.nii.gz,s1,v1,T1w,34\n"
        f"{tmp_path / 'vols' / 'b.nii.gz'},s1,,T2w,34\n"
        "../vols/c.nii,s2,v1,T1w,n/a\n"
        "../vols/gone.nii.gz,s3,v1,T1w,50\n"
    )
    manifest = tmp_path / "pretrain_data.json"
    cols = ["--column", "path=image", "--column", "subject=participant", "--column", "session=visit", "--column", "modality=contrast"]
    code, out, err = _run(capsys, "--table", table, *cols, "-o", manifest)
    assert code == 0, err
    assert sorted((k[0], k[1], k[2], k[3], v["modality"], v["image_info"], v["image_path"]) for k, v in _images(manifest).items()) == [
        ("paths", "s1", "ses-DEFAULT", "b.nii.gz", "T2w", {"age": 34}, "vols/b.nii.gz"),
        ("paths", "s1", "v1", "a.nii.gz", "T1w", {"age": 34}, "vols/a.nii.gz"),
        ("paths", "s2", "v1", "c.nii", "T1w", None, "vols/c.nii"),
    ]
    assert out.splitlines()[0] == "paths: 2 subjects, 3 sessions, 3 images (T1w 2, T2w 1); skipped 1"
    assert "gone.nii.gz: file not found (paths.csv line 5)" in err
    # a TSV with the default column names and a dataset column: one dataset per value
    tsv = tmp_path / "index.tsv"
    tsv.write_text("path\tsubject\tmodality\tdataset\nvols/a.nii.gz\tx\tT1w\tD1\nvols/b.nii.gz\tx\tT1w\tD2\n")
    assert _run(capsys, "--table", tsv, "-o", manifest)[0] == 0
    assert sorted(k[:2] for k in _images(manifest)) == [("D1", "x"), ("D2", "x")]
    assert len(load_manifest(manifest)) == 2


def _one_line_error(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    code, out, err = _run(capsys, *args)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = bids_a(tmp_path / "ds-a")
    scans = plain_folder(tmp_path / "scans")
    out = tmp_path / "out.json"
    o = ["-o", out]
    # a ROOT that is missing, a file, or not BIDS without --pattern
    assert f"{tmp_path / 'nope'}: no such folder" in _one_line_error(capsys, tmp_path / "nope", *o)
    assert "not a folder" in _one_line_error(capsys, a / "participants.tsv", *o)
    assert "not a BIDS dataset" in _one_line_error(capsys, scans, *o)
    code, _, err = _run(capsys, *o)  # neither ROOT nor --table: a usage error (usage line + one error line)
    assert code == 2 and "Missing argument 'ROOT...'" in err and "Traceback" not in err
    # regex without a subject group, with bad syntax, with an unknown group; a pattern without a regex
    assert "--regex: the regex has no subject group" in _one_line_error(capsys, scans, "--pattern", "**/*", "--regex", r"(?P<session>\w+)", *o)
    assert "--regex: not a valid regular expression" in _one_line_error(capsys, scans, "--pattern", "**/*", "--regex", "(?P<subject>", *o)
    assert "unknown group site" in _one_line_error(capsys, scans, "--pattern", "**/*", "--regex", r"(?P<site>\w+)/(?P<subject>P\d+)", *o)
    assert "needs both --pattern and --regex" in _one_line_error(capsys, scans, "--pattern", "**/*", *o)
    assert "no modality group" in _one_line_error(capsys, scans, "--pattern", "**/*", "--regex", r"(?P<subject>P\d+)", *o)
    # no image found: an empty BIDS dataset, a folder whose files the regex never matches, a table of missing files
    _write(tmp_path / "empty", {"dataset_description.json": {"Name": "E"}, "sub-01/func/sub-01_task-x_bold.nii.gz": None})
    err = _one_line_error(capsys, tmp_path / "empty", *o)
    assert "empty: no image found; ignored 1 bold images (not selected)" in err
    err = _one_line_error(capsys, scans, "--pattern", "**/*.nii.gz", "--regex", r"^(?P<subject>Q\d+)/", "--modality", "T1w", *o)
    assert "no image found (6 skipped, e.g." in err and "does not match --regex" in err
    table = tmp_path / "t.csv"
    table.write_text("path,subject,modality\nnot/there.nii.gz,s1,T1w\n")
    assert "no image found (1 skipped" in _one_line_error(capsys, "--table", table, *o)
    # a table missing a column (default name, mapped name), an empty subject cell, an unknown role
    table.write_text("path,participant,modality\na.nii.gz,s1,T1w\n")
    err = _one_line_error(capsys, "--table", table, *o)
    assert f"{table}: header: no 'subject' column (columns: path, participant, modality)" in err and "--column subject=NAME" in err
    assert "no 'visit' column" in _one_line_error(capsys, "--table", table, "--column", "subject=participant", "--column", "session=visit", *o)
    table.write_text("path,subject,modality\na.nii.gz,,T1w\n")
    assert f"{table}:2: subject: empty cell" in _one_line_error(capsys, "--table", table, *o)
    assert "--column: unknown role 'site'" in _one_line_error(capsys, "--table", table, "--column", "site=x", *o)
    assert "--table takes no ROOT" in _one_line_error(capsys, a, "--table", table, *o)
    # two images with the same identity: same file name for one subject/session, the same table row twice,
    # two ROOTs with the same folder name
    err = _one_line_error(capsys, scans, "--pattern", "**/t1.nii.gz", "--regex", r"(?P<subject>P\d+)/", "--modality", "T1w", *o)
    assert "two images have the same identity" in err and "P001/visit1/t1.nii.gz and " in err and "P001/visit2/t1.nii.gz" in err
    _write(tmp_path, {"v.nii.gz": None})
    table.write_text("path,subject,modality\nv.nii.gz,s1,T1w\nv.nii.gz,s1,T1w\n")
    assert "two images have the same identity" in _one_line_error(capsys, "--table", table, *o)
    bids_b(tmp_path / "x" / "ds-a")
    assert "two datasets share the key 'ds-a'" in _one_line_error(capsys, a, tmp_path / "x" / "ds-a", *o)
    # a broken description, a derivative dataset given as ROOT
    (tmp_path / "empty" / "dataset_description.json").write_text("{broken")
    assert "dataset_description.json: not a readable JSON file" in _one_line_error(capsys, tmp_path / "empty", *o)
    (tmp_path / "empty" / "dataset_description.json").write_text('{"Name": "d", "DatasetType": "derivative"}')
    assert "a derivative dataset" in _one_line_error(capsys, tmp_path / "empty", *o)
    # an output that cannot be written
    assert "cannot write the manifest" in _one_line_error(capsys, a, "-o", a / "participants.tsv" / "m.json")
    assert not out.exists()


def test_broken_sidecar_is_reported_and_the_image_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = bids_b(tmp_path / "ds-b")
    (b / "sub-01" / "sub-01_T2w.json").write_text("{not json")
    code, out, err = _run(capsys, b, "-o", tmp_path / "m.json")
    assert code == 0 and "skipped 1" in out
    assert "sub-01_T2w.json: not a readable JSON file" in err and "its metadata is left out" in err
    assert len(_images(tmp_path / "m.json")) == 3


def test_preprocess_runs_on_each_kind_of_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bids = bids_b(tmp_path / "ds-b")
    scans = plain_folder(tmp_path / "scans")
    _write(tmp_path / "vols", {"a.nii.gz": None, "b.nii": None})
    table = tmp_path / "paths.csv"
    table.write_text("path,subject,session,modality\nvols/a.nii.gz,s1,v1,T1w\nvols/b.nii,s2,,T2w\n")
    sources = {
        "bids": [bids],
        "folder": [scans, "--pattern", "**/*.nii.gz", "--regex", FOLDER_REGEX],
        "table": ["--table", table],
    }
    for kind, args in sources.items():
        manifest = tmp_path / kind / "pretrain_data.json"
        assert _run(capsys, *args, "-o", manifest)[0] == 0
        n = len(load_manifest(manifest))
        store = tmp_path / kind / "store"
        assert main(["data", "preprocess", str(manifest), str(store)]) == 0
        assert f"{n} preprocessed, 0 reused, 0 skipped" in capsys.readouterr().out, kind


def test_scale_benchmark_runs_on_a_small_tree() -> None:
    import subprocess
    import sys

    from helpers import REPO

    result = subprocess.run(
        [sys.executable, "benchmarks/manifest.py", "--files", "200"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "20 subjects, 40 sessions, 80 images (T1w 40, T2w 40)" in result.stdout and "files/s" in result.stdout
