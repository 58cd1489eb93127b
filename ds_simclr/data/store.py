"""The preprocessed store: one uncompressed memory-mapped `.npy` per volume plus an index.

Random patches are sliced from the memory map, so a 160^3 patch touches only its own pages, never
the whole volume (see `benchmarks/store.py` for the comparison with blosc2 `.b2nd` that chose this).
Patches that reach past the volume are padded with the volume's background value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ds_simclr.atomic import write_atomic
from ds_simclr.errors import DataError

INDEX_NAME = "store.json"
STORE_FORMAT = "ds_simclr-store/1"
STORE_DTYPE = np.float16
"""z-scored intensities fit float16's range and precision; it halves disk and page-cache bytes."""


@dataclass(frozen=True)
class StoreEntry:
    """One preprocessed volume: its id, file (relative to the store), shape and padding value."""

    id: str
    file: str
    shape: tuple[int, int, int]
    modality: str
    pad_value: float


def write_index(store_dir: Path, entries: list[StoreEntry]) -> Path:
    """Write the store index atomically (readers never see half a file)."""
    path = store_dir / INDEX_NAME
    payload = {"format": STORE_FORMAT, "images": [e.__dict__ | {"shape": list(e.shape)} for e in entries]}
    write_atomic(path, json.dumps(payload, indent=1))
    return path


class PatchStore:
    """Read-only view of a store folder; cheap to open, safe to share between threads."""

    def __init__(self, store_dir: Path, modalities: list[str] | None = None) -> None:
        self.root = Path(store_dir)
        index = self.root / INDEX_NAME
        if not index.is_file():
            raise DataError(
                "not a preprocessed store (no store.json)",
                where=str(self.root),
                hint="run `ds_simclr data preprocess MANIFEST OUT` first",
            )
        payload = json.loads(index.read_text())
        if payload.get("format") != STORE_FORMAT:
            raise DataError(f"unknown store format {payload.get('format')!r}", where=str(index), hint="preprocess again")
        entries = [StoreEntry(**{**e, "shape": tuple(e["shape"])}) for e in payload["images"]]
        if modalities is not None:
            entries = [e for e in entries if e.modality in modalities]
        if not entries:
            raise DataError(
                "the store holds no images" + (f" of modalities {modalities}" if modalities else ""),
                where=str(index),
                hint="check data.modalities or the preprocessing report",
            )
        self.entries = entries
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def volume(self, index: int) -> np.ndarray:
        """The memory map of one volume (opened once, kept)."""
        arr = self._maps.get(index)
        if arr is None:
            arr = np.load(self.root / self.entries[index].file, mmap_mode="r")
            self._maps[index] = arr
        return arr

    def read_patch(self, index: int, start: tuple[int, int, int], size: int) -> np.ndarray:
        """A (size,size,size) patch in the store's dtype (float16) with corner `start` (may be negative).

        Outside the volume is padded. Converting to float32 is left to torch, which does it ~10x
        faster than numpy (and on the GPU after a half-size host-to-device copy)."""
        return cut_patch(self.volume(index), start, size, self.entries[index].pad_value)


def cut_patch(vol: np.ndarray, start: tuple[int, ...], size: int, pad_value: float) -> np.ndarray:
    """Copy only the overlapping part of `vol` into a padded cube of its dtype (reads no other voxels)."""
    out = np.full((size, size, size), pad_value, dtype=vol.dtype)
    src, dst = [], []
    for s, d in zip(start, vol.shape):
        lo, hi = max(s, 0), min(s + size, d)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    out[tuple(dst)] = vol[tuple(src)]
    return out
