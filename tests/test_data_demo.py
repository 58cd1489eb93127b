"""Demo collection: real volumes from installed packages, built and preprocessed once per cache."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest

from ds_simclr.data.demo import build_demo, ensure_demo_store
from ds_simclr.data.manifest import load_manifest
from ds_simclr.data.options import DataSpec, default_cache_dir
from ds_simclr.data.store import FORMAT, PatchStore


def test_build_demo_has_distinct_real_volumes(tmp_path: Path) -> None:
    images = load_manifest(build_demo(tmp_path))
    assert len(images) >= 6
    import nibabel as nib

    arrays = [np.asarray(nib.load(str(im.path)).dataobj) for im in images]
    assert all(a.ndim == 3 and a.std() > 0 for a in arrays)
    assert len({hashlib.sha1(a.tobytes()).hexdigest() for a in arrays}) == len(arrays)
    assert {"T1w", "T2star"} <= {im.modality for im in images}


@pytest.mark.slow
def test_ensure_demo_store_builds_once_even_when_raced(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo_store(tmp_path, jobs=1))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == tmp_path / "demo" / f"store-v{FORMAT}"
    store = PatchStore(results[0])
    assert len(store) >= 6
    marker = results[0] / "store.json"
    stamp = marker.stat().st_mtime_ns
    assert ensure_demo_store(tmp_path) == results[0] and marker.stat().st_mtime_ns == stamp


def test_data_spec_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert DataSpec(demo=True).store is None
    assert DataSpec(store=tmp_path).demo is False
    with pytest.raises(ValueError, match="either"):
        DataSpec()
    with pytest.raises(ValueError, match="either"):
        DataSpec(demo=True, store=tmp_path)
    with pytest.raises(ValueError):
        DataSpec(demo=True, patch_size=8)
    with pytest.raises(ValueError, match="extra"):
        DataSpec(demo=True, patchsize=64)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "ds_simclr"
