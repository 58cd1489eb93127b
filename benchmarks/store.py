"""Store formats for random 160^3 patches: memory-mapped .npy (ours) vs blosc2 .b2nd (nnSSL's).

For real 1 mm volumes (nilearn's MNI152 T1/GM/WM, 197x233x189, z-scored, float16 as stored) it
writes both formats and measures, in one run: random-patch reads/s, whole-volume reads/s, bytes
on disk, and bytes read per pair (a pair = one patch; both views come from it). The page cache is
warm for both (repeated reads of three volumes); on a cold shared file system .npy reads the
patch's bytes (~8 MB float16 at 160^3) and .b2nd reads the compressed chunks the patch touches.

    python benchmarks/store.py [--patch 160] [--reads 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import blosc2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_simclr.data.bench import demo_volumes  # noqa: E402
from ds_simclr.data.params import draw_patch_start  # noqa: E402
from ds_simclr.data.store import STORE_DTYPE, cut_patch  # noqa: E402


def chunks_touched(shape: tuple[int, ...], chunks: tuple[int, ...], start: tuple[int, ...], size: int) -> int:
    n = 1
    for d, c, s in zip(shape, chunks, start):
        lo, hi = max(s, 0), min(s + size, d)
        n *= (hi - 1) // c - lo // c + 1 if hi > lo else 0
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, default=160)
    parser.add_argument("--reads", type=int, default=40, help="random patches per format")
    parser.add_argument("--chunk", type=int, default=64, help="b2nd chunk edge (blocks: half of it)")
    args = parser.parse_args()
    vols = [v.astype(STORE_DTYPE) for v in demo_volumes()]
    with tempfile.TemporaryDirectory() as tmp:
        npy, b2 = [], []
        for i, v in enumerate(vols):
            p = Path(tmp) / f"v{i}.npy"
            np.save(p, v)
            npy.append(p)
            q = Path(tmp) / f"v{i}.b2nd"
            blosc2.asarray(
                np.ascontiguousarray(v),
                urlpath=str(q),
                mode="w",
                chunks=(args.chunk,) * 3,
                blocks=(args.chunk // 2,) * 3,
                cparams={"codec": blosc2.Codec.ZSTD, "clevel": 5},
            )
            b2.append(q)
        starts = [draw_patch_start(vols[k % 3].shape, args.patch, (0, 0, k)) for k in range(args.reads)]
        maps = [np.load(p, mmap_mode="r") for p in npy]
        arrs = [blosc2.open(str(q), mode="r") for q in b2]
        pad = 0.0

        def timed(fn: object, n: int) -> float:
            fn(0)
            t0 = time.perf_counter()
            for k in range(n):
                fn(k)
            return n / (time.perf_counter() - t0)

        npy_patch = timed(lambda k: cut_patch(maps[k % 3], starts[k], args.patch, pad), args.reads)
        b2_patch = timed(lambda k: cut_patch(arrs[k % 3], starts[k], args.patch, pad), args.reads)
        npy_whole = timed(lambda k: np.load(npy[k % 3]), 12)
        b2_whole = timed(lambda k: blosc2.open(str(b2[k % 3]), mode="r")[:], 12)
        check = cut_patch(arrs[0], starts[0], args.patch, pad)
        assert np.array_equal(check, cut_patch(maps[0], starts[0], args.patch, pad))
        disk_npy = sum(p.stat().st_size for p in npy)
        disk_b2 = sum(q.stat().st_size for q in b2)
        voxels = sum(v.size for v in vols)
        touched = np.mean([chunks_touched(vols[k % 3].shape, (args.chunk,) * 3, s, args.patch) for k, s in enumerate(starts)])
        chunk_bytes = disk_b2 / sum(np.prod([-(-d // args.chunk) for d in v.shape]) for v in vols)
        patch_bytes = np.mean([np.prod([min(s + args.patch, d) - max(s, 0) for s, d in zip(st, vols[k % 3].shape)]) for k, st in enumerate(starts)]) * 2
    print(f"{len(vols)} volumes {vols[0].shape} float16, {args.patch}^3 patches, b2nd ZSTD chunks {args.chunk}^3")
    print(f"{'':18s}{'npy (mmap)':>14s}{'b2nd':>14s}{'npy/b2nd':>10s}")
    print(f"{'patch reads/s':18s}{npy_patch:14.1f}{b2_patch:14.1f}{npy_patch / b2_patch:10.2f}")
    print(f"{'whole-volume/s':18s}{npy_whole:14.1f}{b2_whole:14.1f}{npy_whole / b2_whole:10.2f}")
    print(f"{'MB on disk':18s}{disk_npy / 1e6:14.1f}{disk_b2 / 1e6:14.1f}{disk_npy / disk_b2:10.2f}")
    print(f"{'MB read per pair':18s}{patch_bytes / 1e6:14.2f}{touched * chunk_bytes / 1e6:14.2f}")
    print(f"patch reads vs whole-volume reads (npy): {npy_patch / npy_whole:.1f}x; bytes/voxel npy {disk_npy / voxels:.2f}, b2nd {disk_b2 / voxels:.2f}")


if __name__ == "__main__":
    main()
