"""nnSSL pretrain_data.json: strict structure, free-form info dicts, path variables, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import NIBABEL_DATA, write_manifest

from ds_simclr.data.manifest import load_manifest
from ds_simclr.errors import DataError

T1 = str(NIBABEL_DATA / "anatomical.nii")
EPI = str(NIBABEL_DATA / "example4d.nii.gz")


def test_flat_list_with_modality_filter(tmp_path: Path) -> None:
    m = write_manifest(tmp_path / "m.json", [("a.nii", T1, "T1w"), ("b.nii.gz", EPI, "bold")])
    images = load_manifest(m)
    assert [im.modality for im in images] == ["T1w", "bold"]
    assert images[0].path == Path(T1)
    assert images[0].uid == "TestCollection__Dataset001_Test__sub-00__ses-1__a"
    assert [im.modality for im in load_manifest(m, modalities=["bold"])] == ["bold"]


def test_path_variables_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("nnssl_raw", str(NIBABEL_DATA))
    (tmp_path / "vol.nii").write_bytes(Path(T1).read_bytes())
    m = write_manifest(tmp_path / "m.json", [("a.nii", "$nnssl_raw/anatomical.nii", "T1w"), ("v.nii", "vol.nii", "T1w")])
    assert [im.path for im in load_manifest(m)] == [NIBABEL_DATA / "anatomical.nii", tmp_path / "vol.nii"]


def test_unset_variable_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("nnssl_nowhere", raising=False)
    m = write_manifest(tmp_path / "m.json", [("a.nii", "$nnssl_nowhere/a.nii", "T1w")])
    with pytest.raises(DataError, match="nnssl_nowhere") as err:
        load_manifest(m)
    assert "images[0].image_path" in err.value.where


def test_unknown_key_names_file_and_dotted_field(tmp_path: Path) -> None:
    m = write_manifest(tmp_path / "m.json", [("a.nii", T1, "T1w")], modalty="typo")
    with pytest.raises(DataError) as err:
        load_manifest(m)
    assert err.value.where == f"{m}: datasets.Dataset001_Test.subjects.sub-00.sessions.ses-1.images[0].modalty"


def test_missing_required_field(tmp_path: Path) -> None:
    m = write_manifest(tmp_path / "m.json", [("a.nii", T1, "T1w")])
    raw = json.loads(m.read_text())
    del raw["collection_name"]
    m.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="Field required") as err:
        load_manifest(m)
    assert err.value.where.endswith("collection_name")


def test_missing_file_names_the_image(tmp_path: Path) -> None:
    m = write_manifest(tmp_path / "m.json", [("a.nii", T1, "T1w"), ("b.nii", str(tmp_path / "gone.nii"), "T1w")])
    with pytest.raises(DataError, match="gone.nii") as err:
        load_manifest(m)
    assert "sub-01" in err.value.where
    assert len(load_manifest(m, check_files=False)) == 2


def test_not_json_and_not_found(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        load_manifest(tmp_path / "absent.json")


def test_masks_are_resolved(tmp_path: Path) -> None:
    m = write_manifest(
        tmp_path / "m.json", [("a.nii", T1, "T1w")], associated_masks={"anatomy_mask": T1, "anonymization_mask": None}
    )
    assert load_manifest(m)[0].anatomy_mask == Path(T1)


def test_two_images_with_one_id_are_refused(tmp_path: Path) -> None:
    m = write_manifest(tmp_path / "m.json", [("a.nii", T1, "T1w")])
    raw = json.loads(m.read_text())
    session = raw["datasets"]["Dataset001_Test"]["subjects"]["sub-00"]["sessions"]["ses-1"]
    session["images"].append({**session["images"][0], "name": "a.nii.gz"})  # same id: the extension is not part of it
    m.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="two images share the id TestCollection__Dataset001_Test__sub-00__ses-1__a"):
        load_manifest(m)
