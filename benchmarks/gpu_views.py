"""Views/s on the training device (torch only: the lent GPU machine has nothing but torch).

Synthetic smooth patches (no data files needed), the default recipe (crop >= 60, resize, flip,
rotation, shift, contrast), views made by the fused path (one affine_grid + grid_sample) on CUDA,
or the CPU path on the CPU. Also times the recipe with the MRI physics steps switched on. Target on
one H100: >= 500 views/s at 160^3.

    python benchmarks/gpu_views.py                                 # on the GPU
    python benchmarks/gpu_views.py --device cpu --size 64 --batch 2   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_simclr.data.augment import make_views  # noqa: E402
from ds_simclr.data.params import draw_view  # noqa: E402
from ds_simclr.data.recipe import ViewRecipe  # noqa: E402


def smooth_patches(n: int, size: int, device: torch.device) -> torch.Tensor:
    """Random smooth volumes (low-pass noise), z-scored: MRI-like spatial statistics, no files."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(n, 1, max(4, size // 8), max(4, size // 8), max(4, size // 8), generator=g)
    x = F.interpolate(coarse, size=(size, size, size), mode="trilinear", align_corners=False)
    return ((x - x.mean()) / x.std()).to(device)


def rate(recipe: ViewRecipe, patches: torch.Tensor, batch: int, seconds: float, path: str | None) -> float:
    size = patches.shape[-1]
    sync = torch.cuda.synchronize if patches.device.type == "cuda" else (lambda: None)
    k = 0

    def once() -> None:
        nonlocal k
        params = [draw_view(recipe, size, (0, 0, k * batch + i, 1)) for i in range(batch)]
        make_views(patches, params, recipe, path)  # type: ignore[arg-type]
        k += 1

    once()
    sync()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        once()
        done += batch
    sync()
    return done / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=160, help="patch and view edge (voxels)")
    parser.add_argument("--batch", type=int, default=32, help="views per call")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per measurement")
    args = parser.parse_args()
    device = torch.device(args.device)
    patches = smooth_patches(args.batch, args.size, device)
    base = ViewRecipe(output_size=args.size, crop_min=min(60, args.size))
    physics = dataclasses.replace(base, bias_field_prob=0.5, noise_prob=0.5, blur_prob=0.5, gamma_prob=0.5)
    paths = ["fused", "cpu"] if device.type == "cuda" else ["cpu", "fused"]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    print(f"{args.size}^3 views, batch {args.batch}")
    results = {}
    for name, recipe in (("recipe", base), ("recipe+physics", physics)):
        for path in paths:
            r = rate(recipe, patches, args.batch, args.seconds, path)
            results[(name, path)] = r
            print(f"{name:15s} {path:6s} path: {r:9.1f} views/s")
    first, second = paths
    print(f"{first} / {second} (recipe): {results[('recipe', first)] / results[('recipe', second)]:.2f}x")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
