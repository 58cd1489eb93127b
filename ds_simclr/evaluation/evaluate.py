"""`ds_simclr evaluate RUN_DIR`: frozen-encoder probes of a checkpoint, every number beside its floor.

Encoders, all seeing the same patches (paired): the checkpoint's fp32 master weights; the run's own
initial weights (its seed, and `model.init_from` when it has one); random initialisations with the
run's seed and 2 more (mean +- std); and the raw-intensity floor. They run in the run's training
precision. On the embedded evaluation volume (see `atlas`; never a pretraining volume):
- region probe (`patches`, `probes`): `resamples` independent draws of `patches_per_class`
  patches per region and hemisphere; balanced accuracy of a logistic regression and a kNN trained
  on the left hemisphere and tested on the right, as it is and mirrored. The paired gain is the
  checkpoint's score minus its own initial weights' on the same draw; learning is shown when the
  mean gain of the logistic regression on the mirrored test exceeds twice its standard deviation.
- segmentation probe: mean Dice of 6 subcortical structures from the voxel's intensity beside the
  encoder's features, against the intensity alone.
Writes `eval/<tag>/eval.json` and `eval/<tag>/eval.png` into the run directory, prints a table and
logs the numbers to the run's W&B run (resumed by the id kept in the run directory).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_simclr.architectures import check_input_shape
from ds_simclr.atomic import atomic_path, write_atomic
from ds_simclr.errors import DataError
from ds_simclr.evaluation.atlas import LEFT, REGIONS, RIGHT, STRUCTURES, EvalSet, ensure_eval_set, load_eval_set
from ds_simclr.evaluation.patches import check_patch_edge, mirror, region_split, sample_voxels, structure_tiles
from ds_simclr.evaluation.probes import (
    encoder_features,
    raw_features,
    region_scores,
    stage_maps,
    structure_dice,
    voxel_features,
)
from ds_simclr.export import open_run, trained_model
from ds_simclr.rundir import RunPaths
from ds_simclr.spec import RunSpec

REGION_TESTS = ("logreg", "logreg_mirrored", "knn", "knn_mirrored")
HEADLINE = "logreg_mirrored"
"""The test whose paired gain decides whether learning is shown."""
SEG_TRAIN_VOXELS = 300
"""Training voxels per class (background + 6 structures) of the segmentation probe."""
SEG_TEST_VOXELS = 6000
"""Uniformly drawn test voxels of the mirrored right box per resampling."""


@dataclass(frozen=True)
class EvalOptions:
    """How much evaluation: see `ds_simclr evaluate --help`."""

    patch_size: int | None = None
    patches_per_class: int = 16
    resamples: int = 3
    extra_seeds: int = 2
    device: str = "auto"


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": [float(v) for v in values]}


def _encoders(paths: RunPaths, spec: RunSpec, tag: str, extra_seeds: int) -> tuple[dict[str, list[torch.nn.Module]], str]:
    """Models per row: pretrained, own init, random seeds (the run's seed first); and the own init in words."""
    from ds_simclr.warmstart import initial_model

    own, own_words = initial_model(spec)
    randoms = [own if spec.model.init_from is None else initial_model(spec, warm=False)[0]]
    randoms += [initial_model(spec, seed=spec.seed + i, warm=False)[0] for i in range(1, extra_seeds + 1)]
    return {"pretrained": [trained_model(paths, spec, tag)], "own_init": [own], "random": randoms}, own_words


class _Protocol:
    """The patches of one evaluation, cut once and shared by every encoder."""

    def __init__(self, ev: EvalSet, size: int, options: EvalOptions) -> None:
        self.size = size
        self.splits = [region_split(ev, size, options.patches_per_class, seed=r) for r in range(options.resamples)]
        self.mirrored = [mirror(split.test, ev.lr_axis) for split in self.splits]
        self.left, self.right = structure_tiles(ev, LEFT, size), structure_tiles(ev, RIGHT, size)
        self.voxels = [
            (sample_voxels(self.left.labels, np.random.default_rng(r), per_class=SEG_TRAIN_VOXELS),
             sample_voxels(self.right.labels, np.random.default_rng(1000 + r), total=SEG_TEST_VOXELS))
            for r in range(options.resamples)
        ]

    def region(self, features: Callable[[np.ndarray], np.ndarray]) -> list[dict[str, float]]:
        """Scores per resampling for one encoder's `features(patches) -> (n, F)`."""
        return [
            region_scores(features(split.train), split.train_labels,
                          {"": (features(split.test), split.test_labels), "mirrored": (features(mirrored), split.test_labels)})
            for split, mirrored in zip(self.splits, self.mirrored)
        ]

    def segmentation(self, maps: tuple[list[torch.Tensor], list[torch.Tensor]] | None) -> list[float]:
        """Mean Dice per resampling: intensity beside the stage maps (left, right tiles), or alone."""
        dice = []
        for train, test in self.voxels:
            x_train = self.left.tiles.reshape(-1)[train][:, None]  # (n, 1) intensity
            x_test = self.right.tiles.reshape(-1)[test][:, None]
            if maps is not None:
                x_train = np.concatenate([x_train, voxel_features(maps[0], train, self.size)], axis=1)
                x_test = np.concatenate([x_test, voxel_features(maps[1], test, self.size)], axis=1)
            dice.append(structure_dice(x_train, self.left.labels.reshape(-1)[train], x_test,
                                       self.right.labels.reshape(-1)[test], len(STRUCTURES)))
        return dice


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def evaluate_run(run_dir: Path, tag: str | None = None, options: EvalOptions = EvalOptions(),
                 echo: Callable[[str], None] = print, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the protocol on checkpoint `tag` (default: the latest); returns what eval.json holds."""
    started = time.perf_counter()
    paths, spec, tag = open_run(run_dir, tag)
    size = options.patch_size or spec.views.output_size
    try:
        check_input_shape(spec.model.encoder, (size, size, size))
        ensure_eval_set(spec.data.cache_dir)
        ev = load_eval_set(spec.data.cache_dir)
        check_patch_edge(ev, size)
    except ValueError as exc:
        raise DataError(str(exc), where=f"--patch-size {size}") from None
    protocol = _Protocol(ev, size, options)
    dtype = torch.bfloat16 if spec.train.precision == "bf16" else torch.float32
    device = _device(options.device)
    encoders, own_words = _encoders(paths, spec, tag, options.extra_seeds)
    region: dict[str, list[list[dict[str, float]]]] = {}
    seg: dict[str, list[list[float]]] = {}
    done: dict[int, tuple[list[dict[str, float]], list[float]]] = {}  # the own init is also the first random seed
    for row, models in encoders.items():
        region[row], seg[row] = [], []
        for i, model in enumerate(models):
            if id(model) not in done:
                progress(f"evaluate: {row} ({i + 1}/{len(models)})")
                model.to(device=device, dtype=dtype).eval()
                maps = tuple(stage_maps(model, t, dtype, device) for t in (protocol.left.tiles, protocol.right.tiles))
                features = partial(encoder_features, model, dtype=dtype, device=device)
                done[id(model)] = (protocol.region(features), protocol.segmentation(maps))
            region[row].append(done[id(model)][0])
            seg[row].append(done[id(model)][1])
    region["raw"], seg["raw"] = [protocol.region(raw_features)], [protocol.segmentation(None)]

    step = int(tag.split("_")[-1]) if tag.startswith("step_") else None
    report: dict[str, Any] = {
        "run": str(paths.root), "tag": tag, "step": step, "encoder": spec.model.encoder, "precision": spec.train.precision,
        "own_init": own_words, "seeds": [spec.seed + i for i in range(options.extra_seeds + 1)],
        "patch_size": size, "patches_per_class": options.patches_per_class, "resamples": options.resamples,
        "volume": {"description": ev.describe(), **{k: ev.meta[k] for k in ("package", "template", "atlas", "not_in_demo_collection")}},
        "region_probe": {
            "regions": list(REGIONS), "chance": 1 / len(REGIONS), "train": "left hemisphere", "test": "right hemisphere",
            "scores": {row: {test: _stats([r[test] for runs in per_model for r in runs]) for test in REGION_TESTS}
                       for row, per_model in region.items()},
            "paired_gain": {test: _stats([a[test] - b[test] for a, b in zip(region["pretrained"][0], region["own_init"][0])])
                            for test in REGION_TESTS},
        },
        "segmentation_probe": {
            "structures": list(STRUCTURES), "features": "voxel intensity beside the encoder's stage outputs",
            "mean_dice": {row: _stats([d for runs in per_model for d in runs]) for row, per_model in seg.items()},
            "paired_gain": _stats([a - b for a, b in zip(seg["pretrained"][0], seg["own_init"][0])]),
            "encoder_adds": _stats([a - b for a, b in zip(seg["pretrained"][0], seg["raw"][0])]),
        },
    }
    gain = report["region_probe"]["paired_gain"][HEADLINE]
    report["learning_shown"] = bool(gain["mean"] > 2 * gain["std"])
    report["seconds"] = time.perf_counter() - started
    out = paths.root / "eval" / tag
    write_atomic(out / "eval.json", json.dumps(report, indent=1) + "\n")
    plot_report(report, out / "eval.png")
    echo(format_report(report, own_words=own_words, png=out / "eval.png"))
    _log_wandb(paths, spec, report, out / "eval.png")
    return report


def _cell(stats: dict[str, Any], signed: bool = False) -> str:
    return f"{stats['mean']:{'+' if signed else ''}.3f} +- {stats['std']:.3f}"


def format_report(report: dict[str, Any], own_words: str, png: Path) -> str:
    """The table `evaluate` prints."""
    probe, seg = report["region_probe"], report["segmentation_probe"]
    labels = {"pretrained": f"pretrained ({report['tag']})", "own_init": "own init", "raw": "raw intensities",
              "random": f"random init (seeds {', '.join(map(str, report['seeds']))})"}
    width = max(len(v) for v in labels.values()) + 2
    head = "".join(f"{t.replace('_', ' '):>18}" for t in REGION_TESTS)
    lines = [
        f"evaluate {report['run']} {report['tag']}: {report['encoder']}, {report['precision']}, {report['patch_size']}^3"
        f" patches, {report['resamples']} resamplings x {report['patches_per_class']} patches per region and hemisphere",
        f"volume: {report['volume']['description']}",
        f"own init: {own_words}",
        f"region probe ({len(probe['regions'])} regions, chance {probe['chance']:.2f}), balanced accuracy, train left"
        " hemisphere, test right (as is / mirrored), mean +- std:",
        f"{'':{width}}{head}",
    ]
    for row in ("pretrained", "own_init", "random", "raw"):
        lines.append(f"{labels[row]:{width}}" + "".join(f"{_cell(probe['scores'][row][t]):>18}" for t in REGION_TESTS))
    lines.append(f"{'paired gain vs own init':{width}}" + "".join(f"{_cell(probe['paired_gain'][t], True):>18}" for t in REGION_TESTS))
    lines.append(f"segmentation probe (mean Dice of {', '.join(seg['structures'])}; {seg['features']}):")
    for row in ("pretrained", "own_init", "random"):
        lines.append(f"  {labels[row]:{width}}{_cell(seg['mean_dice'][row])}")
    lines.append(f"  {'intensity alone':{width}}{_cell(seg['mean_dice']['raw'])}")
    lines.append(f"  {'paired gain vs own init':{width}}{_cell(seg['paired_gain'], True)}"
                 f"   (the encoder adds {_cell(seg['encoder_adds'], True)} to the intensity)")
    gain = probe["paired_gain"][HEADLINE]
    verdict = "shown" if report["learning_shown"] else "NOT shown"
    lines.append(f"learning {verdict}: paired gain on the mirrored test (logistic regression) {gain['mean']:+.3f},"
                 f" {'above' if report['learning_shown'] else 'not above'} twice its std {2 * gain['std']:.3f}")
    lines.append(f"wrote {png.with_name('eval.json')} and {png} ({report['seconds']:.0f} s)")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Bars with std error bars: the region probe's four tests and the segmentation probe's Dice."""
    from ds_simclr.plots import pyplot

    plt = pyplot()
    rows = ("pretrained", "own_init", "random", "raw")
    colours = ("tab:blue", "tab:orange", "tab:grey", "tab:green")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100, gridspec_kw={"width_ratios": [3, 1]})
    width = 0.2
    for i, (row, colour) in enumerate(zip(rows, colours)):
        scores = [report["region_probe"]["scores"][row][t] for t in REGION_TESTS]
        x = np.arange(len(REGION_TESTS)) + (i - 1.5) * width
        ax1.bar(x, [s["mean"] for s in scores], width, yerr=[s["std"] for s in scores], color=colour,
                label=row.replace("_", " "), capsize=2)
        dice = report["segmentation_probe"]["mean_dice"][row]
        ax2.bar(i, dice["mean"], 0.7, yerr=dice["std"], color=colour, capsize=2)
    ax1.axhline(report["region_probe"]["chance"], color="black", lw=0.8, ls="--", label="chance")
    ax1.set_xticks(np.arange(len(REGION_TESTS)), [t.replace("_", " ") for t in REGION_TESTS])
    ax1.set_ylabel("balanced accuracy")
    ax1.set_title(f"region probe, {report['tag']}: train left, test right")
    ax1.legend(fontsize=8)
    ax2.set_xticks(range(len(rows)), ["pre", "init", "rand", "raw"])
    ax2.set_ylabel("mean Dice")
    ax2.set_title("subcortical segmentation")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _log_wandb(paths: RunPaths, spec: RunSpec, report: dict[str, Any], png: Path) -> None:
    """Continue the run's W&B run (when it has one) with the evaluation's numbers and picture."""
    if spec.logging.wandb_mode == "disabled" or not (paths.wandb / "run_id").is_file():
        return
    from ds_simclr.telemetry import WandbRun

    row: dict[str, Any] = {"evaluate/step": report["step"] or 0}
    for name, scores in report["region_probe"]["scores"].items():
        row.update({f"evaluate/region_{test}/{name}": s["mean"] for test, s in scores.items()})
    row.update({f"evaluate/region_{t}/gain": s["mean"] for t, s in report["region_probe"]["paired_gain"].items()})
    row.update({f"evaluate/segmentation_dice/{n}": s["mean"] for n, s in report["segmentation_probe"]["mean_dice"].items()})
    run = WandbRun(paths, spec.logging.wandb_project, spec.logging.wandb_entity, spec.logging.wandb_mode,
                   spec.name or paths.root.name, config={})
    try:
        run.summarize(row, {"evaluate/plot": str(png)})
    finally:
        run.close()
