"""Pictures of a run: loss and LR against the optimizer step, and one sample's two views.

The planned LR curve is recomputed from the run's own spec.yaml (DeepSpeed's scheduler class), so
the plot shows plan and realisation side by side. The views are remade from the spec and the
store: they are a function of (seed, epoch, sample, view), so no image has to be saved while
training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ds_simclr.errors import DataError
from ds_simclr.rundir import RunPaths


def pyplot():
    """matplotlib.pyplot on the Agg back-end (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def view_slices(view1: torch.Tensor, view2: torch.Tensor) -> np.ndarray:
    """A uint8 grid (2 rows: views; 3 columns: the middle slice along each axis) of one sample."""
    rows = []
    for view in (view1, view2):
        volume = view.detach().float().cpu().reshape(view.shape[-3:]).numpy()
        centre = [s // 2 for s in volume.shape]
        slices = [volume[centre[0]], volume[:, centre[1]], volume[:, :, centre[2]]]
        rows.append(np.concatenate([np.rot90(s) for s in slices], axis=1))
    grid = np.concatenate(rows, axis=0)
    low, high = np.percentile(grid, [1, 99])
    return (np.clip((grid - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def plot_loss(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    steps = [r["step"] for r in rows if not r.get("skipped")]
    losses = [r["loss"] for r in rows if not r.get("skipped")]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(steps, losses, color="tab:blue", label="NT-Xent loss (global batch)")
    skipped = [r["step"] for r in rows if r.get("skipped")]
    if skipped:
        ax.plot(skipped, [min(losses or [0])] * len(skipped), "x", color="tab:red", label="skipped (non-finite)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_views(image: np.ndarray, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    ax.imshow(image, cmap="gray")
    ax.set_title(title)
    ax.set_yticks([image.shape[0] // 4, 3 * image.shape[0] // 4], ["view 1", "view 2"])
    ax.set_xticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_views(paths: RunPaths) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of the run's first sample (step 0, slot 0), remade on the CPU."""
    from ds_simclr.data.loader import PairLoader
    from ds_simclr.data.source import resolve_store
    from ds_simclr.specload import load_spec

    spec = load_spec(paths.spec)
    loader = PairLoader(
        resolve_store(spec.data), spec.data, spec.views.model_copy(update={"device": "cpu"}), seed=spec.seed,
        global_batch=1, micro_batch=1, grad_accum=1, steps_per_epoch=spec.train.steps_per_epoch,
        rank=0, world_size=1, device=torch.device("cpu"),
    )
    try:
        batch = next(loader.iterate(0))
    finally:
        loader.close()
    return batch.view1[0], batch.view2[0]


def plot_run(run_dir: Path) -> list[Path]:
    """Write plots/loss.png, plots/lr.png and plots/views.png for a run directory."""
    from ds_simclr.planning import plot_lr_curve
    from ds_simclr.schedule import planned_lrs
    from ds_simclr.specload import load_spec
    from ds_simclr.telemetry import read_metrics

    paths = RunPaths(Path(run_dir))
    if not paths.metrics.is_file() or not paths.spec.is_file():
        raise DataError("not a run directory (no metrics.jsonl or spec.yaml)", where=str(run_dir),
                        hint="give the folder `launch` or `train` wrote")
    rows = read_metrics(paths.metrics)
    spec = load_spec(paths.spec)
    paths.plots.mkdir(parents=True, exist_ok=True)
    written = [paths.plots / "loss.png", paths.plots / "lr.png", paths.plots / "views.png"]
    plot_loss(rows, written[0])
    plot_lr_curve(planned_lrs(spec), written[1], title=f"{spec.name}: learning rate",
                  realised=[(r["step"], r["lr"]) for r in rows])
    plot_views(view_slices(*sample_views(paths)), written[2], title=f"{spec.name}: one sample, two views")
    return written
