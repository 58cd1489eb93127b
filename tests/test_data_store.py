"""Patch store: patches equal slices of the volume, overhang is padded, volumes stay memory-mapped."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest
from data_helpers import real_store

from ds_simclr.data.params import draw_patch_start
from ds_simclr.data.store import PatchStore, cut_patch
from ds_simclr.errors import DataError


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_store(tmp_path_factory.mktemp("store"))


def test_patch_is_a_slice_of_the_volume(store: Path) -> None:
    ps = PatchStore(store)
    patch = ps.read_patch(0, (3, 4, 5), 16)
    with ps.volume(0) as vol:
        assert isinstance(vol.base, mmap.mmap)
        assert patch.dtype == np.float16 and patch.shape == (16, 16, 16)
        np.testing.assert_array_equal(patch, vol[3:19, 4:20, 5:21])


def test_overhang_is_padded_with_background(store: Path) -> None:
    ps = PatchStore(store)
    with ps.volume(0) as mapped:
        vol = np.array(mapped)
    size = max(vol.shape) + 10
    patch = ps.read_patch(0, (-5, -5, -5), size)
    pad = np.float16(ps.pad_value(0))
    z, y, x = vol.shape
    np.testing.assert_array_equal(patch[5 : 5 + z, 5 : 5 + y, 5 : 5 + x], vol)
    assert (patch[:5] == pad).all() and (patch[5 + z :] == pad).all()


def test_random_starts_cover_small_and_large_volumes() -> None:
    for shape in [(20, 40, 60), (100, 100, 100)]:
        for slot in range(50):
            start = draw_patch_start(shape, 50, (1, 0, slot))
            for s, d in zip(start, shape):
                assert min(0, d - 50) <= s <= max(0, d - 50)
        vol = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        patch = cut_patch(vol, draw_patch_start(shape, 50, (1, 0, 0)), 50, -1.0)
        assert patch.shape == (50, 50, 50)
        assert (patch >= 0).sum() == np.prod([min(d, 50) for d in shape])


def test_modality_filter_and_errors(store: Path, tmp_path: Path) -> None:
    t2 = PatchStore(store, ["T2star"])
    assert [t2.modality(i) for i in range(len(t2))] == ["T2star"]
    with pytest.raises(DataError, match="no images of modalities"):
        PatchStore(store, ["FLAIR"])
    with pytest.raises(DataError, match="data preprocess"):
        PatchStore(tmp_path)
