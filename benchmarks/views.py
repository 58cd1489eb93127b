"""Views/s at 160^3: our batched pipeline against the seed's per-sample MONAI recipe, one run.

Same real volumes (nilearn's MNI152 T1/GM/WM, z-scored), same patches, same recipe numbers, same
machine; the two are timed in alternating rounds so a busy machine slows both alike. Prints the
ratio ours / MONAI. `ds_simclr bench views SPEC` runs the same function (ds_simclr.data.bench).

    python benchmarks/views.py                       # default recipe, 160^3, ~1 minute on 2 cores
    python benchmarks/views.py --size 96 --seconds 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_simclr.data.bench import bench_views  # noqa: E402
from ds_simclr.data.options import ViewsSpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160, help="view edge = patch edge (voxels)")
    parser.add_argument("--batch", type=int, default=8, help="views per batched call of ours")
    parser.add_argument("--seconds", type=float, default=24.0, help="seconds per pipeline")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (ours; MONAI runs per sample on the CPU)")
    args = parser.parse_args()
    views = ViewsSpec(output_size=args.size, crop_min=min(60, args.size))
    r = bench_views(views, device=args.device, patch_size=args.size, batch=args.batch, seconds=args.seconds)
    print(f"device {r.device}, {r.threads} torch threads, views {r.output_size}^3 from {r.patch_size}^3 patches")
    print(f"ours (batched x{r.batch}): {r.ours_views_per_s:8.2f} views/s")
    print(f"MONAI per sample:       {r.monai_views_per_s:8.2f} views/s")
    print(f"ratio ours / MONAI:     {r.ratio:8.2f}x")


if __name__ == "__main__":
    main()
