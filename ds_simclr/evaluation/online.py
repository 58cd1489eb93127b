"""The cheap probe rank 0 runs every `eval.every_steps` during pretraining.

One fixed draw (seed = the run's seed) of `eval.patches_per_class` region patches per region and
hemisphere; the encoder as it trains (its module, in the training dtype) embeds them, and a
logistic regression and a kNN trained on the left hemisphere are scored on the mirrored right one.
The data come from the evaluation set `launch` built into the cache; here they are only loaded.
"""

from __future__ import annotations

import time

import torch

from ds_simclr.errors import DataError
from ds_simclr.evaluation.atlas import load_eval_set
from ds_simclr.evaluation.patches import check_patch_edge, mirror, region_split
from ds_simclr.evaluation.probes import encoder_features, region_scores
from ds_simclr.spec import RunSpec


class OnlineProbe:
    """Built once on rank 0 (loads and cuts the patches); called with the training module."""

    def __init__(self, spec: RunSpec, device: torch.device) -> None:
        ev = load_eval_set(spec.data.cache_dir)
        try:
            check_patch_edge(ev, spec.eval_patch_size)
        except ValueError as exc:
            raise DataError(str(exc), where=spec.where("eval.patch_size")) from None
        split = region_split(ev, spec.eval_patch_size, spec.eval.patches_per_class, spec.seed)
        self.train, self.train_labels = split.train, split.train_labels
        self.test, self.test_labels = mirror(split.test, ev.lr_axis), split.test_labels
        self.device = device

    def __call__(self, module: torch.nn.Module, dtype: torch.dtype) -> dict[str, float]:
        """`probe_logreg_mirrored`, `probe_knn_mirrored` (balanced accuracy) and `time_eval_s`."""
        started = time.perf_counter()
        train = encoder_features(module, self.train, dtype, self.device)
        test = encoder_features(module, self.test, dtype, self.device)
        scores = region_scores(train, self.train_labels, {"mirrored": (test, self.test_labels)})
        return {**{f"probe_{k}": v for k, v in scores.items()}, "time_eval_s": time.perf_counter() - started}
