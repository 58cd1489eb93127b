"""Which store a data section trains from: an existing store, or a manifest preprocessed once."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import NIBABEL_DATA, write_manifest

from ds_simclr.data.options import DataSpec
from ds_simclr.data.source import prepare_store, resolve_store
from ds_simclr.data.store import FORMAT, PatchStore
from ds_simclr.errors import DataError


def test_manifest_is_preprocessed_once_into_the_cache(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.json", [("a.nii", str(NIBABEL_DATA / "anatomical.nii"), "T1w")])
    data = DataSpec(manifest=manifest, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="no store.json") as err:  # ranks never build a store
        resolve_store(data)
    assert f"ds_simclr data preprocess {manifest}" in (err.value.hint or "")
    lines: list[str] = []
    store = prepare_store(data, jobs=1, nodes=1, echo=lines.append)
    assert store.parent == tmp_path / "cache" / "stores" and store.name.endswith(f"-v{FORMAT}")
    assert lines[0].startswith(f"preprocessing {manifest}") and lines[1].startswith("1 preprocessed, 0 reused, 0 skipped")
    assert len(PatchStore(store)) == 1
    stamp = (store / "store.json").stat().st_mtime_ns
    assert prepare_store(data, jobs=1, nodes=1, echo=lines.append) == store and len(lines) == 2
    assert (store / "store.json").stat().st_mtime_ns == stamp
    assert resolve_store(data) == store == resolve_store(DataSpec(store=store))


def test_a_manifest_to_preprocess_on_several_nodes_is_refused_with_the_command(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.json", [("a.nii", str(NIBABEL_DATA / "anatomical.nii"), "T1w")])
    data = DataSpec(manifest=manifest, store=tmp_path / "store")
    with pytest.raises(DataError, match="has 3 nodes") as err:
        prepare_store(data, jobs=1, nodes=3)
    assert err.value.where == "data.manifest"
    assert f"ds_simclr data preprocess {manifest} {tmp_path / 'store'} -j N" in (err.value.hint or "")
    assert not (tmp_path / "store").exists()


def test_store_without_index_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no store.json") as err:
        resolve_store(DataSpec(store=tmp_path))
    assert "data preprocess" in (err.value.hint or "")


def test_an_unset_variable_in_a_data_path_is_named(tmp_path: Path, monkeypatch) -> None:
    from ds_simclr.data.source import check_data_paths
    from ds_simclr.errors import DataError

    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(DataError, match=r"\$NOT_SET_ANYWHERE is not set"):
        check_data_paths(DataSpec(store=Path("$NOT_SET_ANYWHERE/store")))
