"""The data commands as a user types them: demo collection, preprocessing with a broken file in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_simclr.cli import main

pytestmark = pytest.mark.slow


def test_demo_then_preprocess_reports_the_broken_file(tmp_path: Path, capsys) -> None:
    assert main(["data", "demo", str(tmp_path / "raw")]) == 0
    manifest = tmp_path / "raw" / "pretrain_data.json"
    assert "demo collection written" in capsys.readouterr().out

    broken = tmp_path / "raw" / "broken.nii.gz"
    broken.write_bytes(b"this is no NIfTI file")
    data = json.loads(manifest.read_text())
    dataset = next(iter(data["datasets"].values()))  # nnSSL: collection > datasets > subjects > sessions
    subject = next(iter(dataset["subjects"].values()))
    session = next(iter(subject["sessions"].values()))
    session["images"].append({**session["images"][0], "name": "broken.nii.gz", "image_path": "broken.nii.gz"})
    manifest.write_text(json.dumps(data))

    store = tmp_path / "store"
    assert main(["data", "preprocess", str(manifest), str(store), "-j", "2"]) == 1  # 1: some image was skipped
    captured = capsys.readouterr()
    assert "1 skipped" in captured.out and "broken.nii.gz" in captured.err
    assert (store / "store.json").is_file()
    assert main(["data", "preprocess", str(manifest), str(store)]) == 1  # a rerun reuses the finished images
    assert "0 preprocessed" in capsys.readouterr().out


def test_preprocess_of_a_missing_manifest_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["data", "preprocess", str(tmp_path / "nope.json"), str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.json" in err
