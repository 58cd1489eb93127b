"""Views/s of our pipeline against the old per-sample MONAI recipe, same patches, same machine.

`bench_views` is what `ds_simclr bench views SPEC` calls; `benchmarks/views.py` wraps it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ds_simclr.data.augment import make_views
from ds_simclr.data.options import ViewsSpec
from ds_simclr.data.params import draw_patch_start, draw_view
from ds_simclr.data.store import cut_patch


@dataclass(frozen=True)
class ViewsBench:
    """Result of one benchmark run (views/s; ratio = ours / MONAI)."""

    device: str
    output_size: int
    patch_size: int
    batch: int
    ours_views_per_s: float
    monai_views_per_s: float | None
    ratio: float | None
    threads: int


def demo_volumes() -> list[np.ndarray]:
    """Real 1 mm volumes (nilearn MNI152 T1, GM, WM), z-scored over non-zero voxels, C order like the store."""
    from nilearn import datasets

    out = []
    for loader in ("load_mni152_template", "load_mni152_gm_template", "load_mni152_wm_template"):
        vol = np.asarray(getattr(datasets, loader)(resolution=1).get_fdata(), dtype=np.float32)
        fg = vol[vol != 0]
        out.append(np.ascontiguousarray((vol - fg.mean()) / fg.std()))
    return out


def monai_recipe(views: ViewsSpec, patch_size: int) -> object:
    """The seed's per-sample MONAI chain with the spec's numbers (crop, resize, flip, rotate, shift, contrast)."""
    import math

    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAxisFlip,
        RandRotate,
        RandShiftIntensity,
        RandSpatialCrop,
        Resize,
    )

    r = [math.radians(a) for a in views.rotate_range_deg]
    return Compose(
        [
            RandSpatialCrop(min(views.crop_min, patch_size), random_size=True),
            Resize((views.output_size,) * 3, mode="trilinear"),
            RandAxisFlip(prob=views.flip_prob),
            RandRotate(range_x=r[0], range_y=r[1], range_z=r[2], prob=views.rotate_prob, padding_mode="border"),
            RandShiftIntensity(offsets=views.shift_range, prob=views.shift_prob),
            RandAdjustContrast(gamma=views.contrast_gamma, prob=views.contrast_prob),
        ]
    )


def _patches(volumes: list[np.ndarray], n: int, size: int, seed: int) -> torch.Tensor:
    cubes = [
        cut_patch(v, draw_patch_start(v.shape, size, (seed, 0, i)), size, float(v.min()))
        for i, v in ((i, volumes[i % len(volumes)]) for i in range(n))
    ]
    return torch.from_numpy(np.stack(cubes)[:, None])


def _interleaved(fns: list[object], per_call: list[int], seconds: float, rounds: int = 4) -> list[float]:
    """Rates of several functions timed in alternating rounds, so a busy machine hurts all alike."""
    for fn in fns:
        fn()  # warm-up (allocator, lazy imports)
    done, spent = [0] * len(fns), [0.0] * len(fns)
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds / rounds:
                fn()
                done[k] += per_call[k]
            spent[k] += time.perf_counter() - t0
    return [d / s for d, s in zip(done, spent)]


def bench_views(
    views: ViewsSpec | None = None,
    *,
    device: str = "auto",
    patch_size: int = 160,
    batch: int = 8,
    seconds: float = 20.0,
    compare_monai: bool = True,
    volumes: list[np.ndarray] | None = None,
    seed: int = 0,
) -> ViewsBench:
    """Measure views/s: ours (batched on `device`) and, if asked, the MONAI recipe per sample on the CPU."""
    views = views or ViewsSpec()
    recipe = views.recipe()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    vols = volumes if volumes is not None else demo_volumes()
    patches = _patches(vols, batch, patch_size, seed)
    on_dev = patches.to(dev)
    counter = iter(range(10**9))

    def ours() -> None:
        k = next(counter)
        params = [draw_view(recipe, patch_size, (seed, 0, k * batch + i, 1)) for i in range(batch)]
        make_views(on_dev, params, recipe)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    fns, per_call = [ours], [batch]
    if compare_monai:
        chain = monai_recipe(views, patch_size)
        chain.set_random_state(seed)
        i = iter(range(10**9))

        def theirs() -> None:
            chain(patches[next(i) % batch])

        fns.append(theirs)
        per_call.append(1)
    rates = _interleaved(fns, per_call, seconds)
    ours_rate, monai_rate = rates[0], (rates[1] if compare_monai else None)
    return ViewsBench(
        device=str(dev),
        output_size=recipe.output_size,
        patch_size=patch_size,
        batch=batch,
        ours_views_per_s=ours_rate,
        monai_views_per_s=monai_rate,
        ratio=ours_rate / monai_rate if monai_rate else None,
        threads=torch.get_num_threads(),
    )
