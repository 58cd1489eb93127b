"""Frozen-encoder features and the scores of linear and nearest-neighbour probes on them.

Region probe: the encoder's pooled multi-stage features (`SimCLRModel.features`, what the head
reads) of each patch; a logistic regression and a 5-nearest-neighbour classifier (scikit-learn, on
standardised features) trained on the left hemisphere and scored by balanced accuracy on the right.
The floor: the patch's raw intensities average-pooled to 8^3.

Segmentation probe: per voxel, the raw intensity beside the encoder's stage outputs interpolated
to the voxel (trilinear, what upsampling each stage map would give); a logistic regression
trained on balanced voxels of the left hemisphere's subcortical box and scored by the mean Dice of
the 6 structures on a uniform sample of the mirrored right box. The floor: the intensity alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

RAW_GRID = 8
"""Edge of the average-pooled intensity grid of the raw floor (8^3 = 512 features)."""
KNN_NEIGHBOURS = 5
SERIAL_BLAS = {"limits": 1, "user_api": "blas"}
"""The probes' matrices are small: a multi-threaded BLAS only spins (30x slower on a busy 2-core machine)."""


@torch.no_grad()
def encoder_features(model: torch.nn.Module, patches: np.ndarray, dtype: torch.dtype, device: torch.device,
                     batch: int = 32) -> np.ndarray:
    """(n, S, S, S) patches -> (n, F) float32 pooled features; `model` runs in `dtype` on `device`."""
    out = []
    for i in range(0, len(patches), batch):
        x = torch.from_numpy(patches[i : i + batch]).to(device=device, dtype=dtype).unsqueeze(1)  # (b, 1, S, S, S)
        out.append(model.features(x).float().cpu())  # (b, F)
    return torch.cat(out).numpy()


def raw_features(patches: np.ndarray, grid: int = RAW_GRID) -> np.ndarray:
    """(n, S, S, S) -> (n, grid^3): intensities average-pooled to a grid^3 cube."""
    x = torch.from_numpy(patches).unsqueeze(1)  # (n, 1, S, S, S)
    return F.adaptive_avg_pool3d(x, grid).flatten(1).numpy()  # (n, grid^3)


def _pipelines() -> dict[str, object]:
    return {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(KNN_NEIGHBOURS)),
    }


def region_scores(train_x: np.ndarray, train_y: np.ndarray, tests: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Balanced accuracy of each classifier on each test set: keys `<classifier>` + `_<test>` suffix
    (`logreg`, `logreg_mirrored`, `knn`, ...; the test named "" has no suffix)."""
    scores = {}
    with threadpool_limits(**SERIAL_BLAS):
        for name, classifier in _pipelines().items():
            classifier.fit(train_x, train_y)
            for test, (x, y) in tests.items():
                scores[f"{name}_{test}" if test else name] = float(balanced_accuracy_score(y, classifier.predict(x)))
    return scores


@torch.no_grad()
def stage_maps(model: torch.nn.Module, tiles: np.ndarray, dtype: torch.dtype, device: torch.device,
               batch: int = 8) -> list[torch.Tensor]:
    """(t, S, S, S) tiles -> every encoder stage's output [(t, C_s, S/d_s, ...)] float32 on the CPU."""
    per_stage: list[list[torch.Tensor]] = []
    for i in range(0, len(tiles), batch):
        x = torch.from_numpy(tiles[i : i + batch]).to(device=device, dtype=dtype).unsqueeze(1)
        for s, out in enumerate(model.encoder(x)):
            if s == len(per_stage):
                per_stage.append([])
            per_stage[s].append(out.float().cpu())
    return [torch.cat(parts) for parts in per_stage]


def voxel_features(maps: list[torch.Tensor], flat: np.ndarray, size: int) -> np.ndarray:
    """Stage outputs at voxels `flat` (indices into (t, S, S, S)) -> (n, sum C_s) float32.

    Each stage map is sampled trilinearly at the voxel's centre in normalised coordinates
    (align_corners=False), which is what upsampling the map to S^3 would give there.
    """
    tile, *axes = np.unravel_index(flat, (maps[0].shape[0], size, size, size))
    coords = torch.from_numpy((2 * np.stack(axes, axis=1) + 1) / size - 1).float()  # (n, 3) in array-axis order
    grid = coords.flip(1)  # grid_sample wants (x, y, z) = (W, H, D)
    out = torch.zeros(len(flat), sum(m.shape[1] for m in maps))
    for t in np.unique(tile):
        rows = torch.from_numpy(np.flatnonzero(tile == t))
        g = grid[rows].view(1, 1, 1, -1, 3)  # (1, 1, 1, n_t, 3)
        sampled = [F.grid_sample(m[t : t + 1], g, mode="bilinear", align_corners=False) for m in maps]
        out[rows] = torch.cat([s.view(s.shape[1], -1) for s in sampled]).T  # (n_t, sum C_s)
    return out.numpy()


def structure_dice(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   n_structures: int) -> float:
    """Mean Dice of labels 1..n_structures after a logistic regression on standardised voxel features."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    with threadpool_limits(**SERIAL_BLAS):
        predicted = classifier.fit(train_x, train_y).predict(test_x)
    dice = []
    for k in range(1, n_structures + 1):
        truth, guess = test_y == k, predicted == k
        denominator = truth.sum() + guess.sum()
        dice.append(2 * (truth & guess).sum() / denominator if denominator else 1.0)
    return float(np.mean(dice))
