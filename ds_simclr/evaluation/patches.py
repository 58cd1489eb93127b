"""Probe inputs cut from the evaluation volume (numpy only).

Region probe: cubes centred on voxels of a coarse region, balanced over the 7 regions; the left
hemisphere trains, the right one tests, as it is and mirrored left-right (the hemispheres are near
mirror images, so a mirrored right patch looks like a left one). Segmentation probe: non-overlapping
cubes tiling the box around one hemisphere's subcortical structures, the right one mirrored.
Every draw is a function of the seed, so all encoders of one evaluation see the same patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ds_simclr.data.store import cut_patch
from ds_simclr.evaluation.atlas import LEFT, REGIONS, RIGHT, STRUCTURES, EvalSet

IGNORE = 255
"""Segmentation label of voxels outside the brain or of the other hemisphere's structures."""


@dataclass(frozen=True)
class RegionSplit:
    """One resampling of the region probe: patches (n, S, S, S) float32 and labels (n,) 0..6."""

    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.train), len(self.test)


def check_patch_edge(ev: EvalSet, size: int) -> None:
    """Raise ValueError when cubes of edge `size` (voxels) exceed the evaluation volume's shortest side."""
    if size > min(ev.image.shape):
        raise ValueError(f"{size}^3 patches are larger than the evaluation volume {tuple(ev.image.shape)}")


def _cut(volume: np.ndarray, centres: np.ndarray, size: int, pad_value: float) -> np.ndarray:
    """(n, 3) centre voxels -> (n, size, size, size) cubes in the volume's dtype, padded outside."""
    half = size // 2
    return np.stack([cut_patch(volume, tuple(int(c) - half for c in centre), size, pad_value) for centre in centres])


def mirror(cubes: np.ndarray, lr_axis: int) -> np.ndarray:
    """Flip (n, S, S, S) cubes left-right."""
    return np.ascontiguousarray(np.flip(cubes, axis=1 + lr_axis))


def _region_patches(ev: EvalSet, side: int, size: int, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres, labels = [], []
    for k in range(1, len(REGIONS) + 1):
        voxels = ev.voxels("region", k, side)
        chosen = rng.choice(voxels, size=min(per_class, len(voxels)), replace=False)
        centres.append(np.stack(np.unravel_index(chosen, ev.region.shape), axis=1))
        labels.append(np.full(len(chosen), k - 1))
    patches = _cut(ev.image, np.concatenate(centres), size, ev.pad_value).astype(np.float32)
    return patches, np.concatenate(labels)


def region_split(ev: EvalSet, size: int, per_class: int, seed: int) -> RegionSplit:
    """`per_class` patches of edge `size` per region and hemisphere, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    train, train_labels = _region_patches(ev, LEFT, size, per_class, rng)
    test, test_labels = _region_patches(ev, RIGHT, size, per_class, rng)
    return RegionSplit(train, train_labels, test, test_labels)


@dataclass(frozen=True)
class StructureTiles:
    """Cubes (t, S, S, S) float32 tiling one hemisphere's subcortical box, and their labels (t, S, S, S)
    uint8: 0 = other brain, k = STRUCTURES[k - 1], IGNORE = outside the brain or the other hemisphere."""

    tiles: np.ndarray
    labels: np.ndarray


def structure_tiles(ev: EvalSet, side: int, size: int, margin: int = 4) -> StructureTiles:
    """Tile the bounding box of `side`'s structures (+ margin); the right side comes back mirrored."""
    voxels = np.argwhere((ev.structure > 0) & (ev.side == side))
    low, high = voxels.min(0) - margin, voxels.max(0) + 1 + margin
    counts = np.ceil((high - low) / size).astype(int)
    start = (low + high) // 2 - counts * size // 2  # grid centred on the box
    labels = np.where(ev.side == side, ev.structure, np.where(ev.structure > 0, IGNORE, 0)).astype(np.uint8)
    labels[ev.image <= np.float16(ev.pad_value)] = IGNORE  # background: zero before the z-score
    corners = [start + size * np.array(idx) for idx in np.ndindex(*counts)]
    centres = np.array(corners) + size // 2
    tiles = _cut(ev.image, centres, size, ev.pad_value).astype(np.float32)
    tile_labels = _cut(labels, centres, size, IGNORE)
    if side == RIGHT:
        tiles, tile_labels = mirror(tiles, ev.lr_axis), mirror(tile_labels, ev.lr_axis)
    return StructureTiles(tiles, tile_labels)


def sample_voxels(labels: np.ndarray, rng: np.random.Generator, per_class: int | None = None, total: int | None = None) -> np.ndarray:
    """Flat indices into `labels` (t, S, S, S), IGNORE never: `per_class` of each label present
    (balanced training), or `total` drawn uniformly (a test sample whose Dice estimates the box's)."""
    flat = labels.reshape(-1)
    if per_class is not None:
        picks = []
        for k in range(len(STRUCTURES) + 1):
            where = np.flatnonzero(flat == k)
            picks.append(rng.choice(where, size=min(per_class, len(where)), replace=False))
        return np.concatenate(picks)
    where = np.flatnonzero(flat != IGNORE)
    return rng.choice(where, size=min(total or len(where), len(where)), replace=False)
