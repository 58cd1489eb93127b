"""Patch reads from the store: our bounded reader against the old unbounded one, warm and cold, and
memory-mapped .npy (ours) against blosc2 .b2nd (nnSSL's format).

Real 1 mm volumes (nilearn's MNI152 T1/GM/WM, 197x233x189, z-scored, float16 as stored), copied
into `--files` volumes of a real store (more than `--max-open`, so our reader closes and reopens
volumes as a 100k-volume store makes it do). Random 160^3 patches from random volumes.

- warm: page cache holds every file. Reference = the reader before this version (every volume
  mapped on first use and kept: +1 descriptor and +1 map per volume, never released), kept here to
  measure against; ours = `PatchStore` with at most `--max-open` descriptors. Each patch is read by
  both, back to back (first one, then the other), so a busy machine slows both alike; each round
  draws new patches (as training does: a position per epoch and slot); prints ours / reference.
- cold: before each read the file is evicted from the page cache (posix_fadvise DONTNEED), so the
  read goes to the disk; bytes read per pair (one patch; both views come from it) are the process's
  `read_bytes` from /proc/self/io. .npy is read through mmap with the kernel's read-ahead (the
  default) and with MADV_RANDOM (only the faulted pages); .b2nd reads the compressed chunks the
  patch touches.

    python benchmarks/store.py [--patch 160] [--reads 60] [--files 96] [--max-open 64] [--cold-reads 12]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import blosc2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_simclr.data.bench import demo_volumes  # noqa: E402
from ds_simclr.data.params import draw_patch_start  # noqa: E402
from ds_simclr.data.store import STORE_DTYPE, PatchStore, cut_patch, map_npy, write_index, write_volume  # noqa: E402


class ReferenceReader:
    """The patch reader before this version, kept as the reference: np.load maps, kept forever."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths, self.maps = paths, {}

    def read_patch(self, index: int, start: tuple[int, int, int], size: int) -> np.ndarray:
        vol = self.maps.get(index)
        if vol is None:
            vol = self.maps[index] = np.load(self.paths[index], mmap_mode="r")
        return cut_patch(vol, start, size, 0.0)


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (written back first: dirty pages cannot be dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


def read_ahead(path: Path) -> str:
    """The read-ahead of the block device holding `path` (mmap faults read around this much)."""
    dev = os.stat(path).st_dev
    sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for queue in (sysfs / "queue", sysfs / ".." / "queue"):
        if (queue / "read_ahead_kb").is_file():
            return f"{(queue / 'read_ahead_kb').read_text().strip()} KB"
    return "unknown"


def chunks_touched(shape: tuple[int, ...], chunks: tuple[int, ...], start: tuple[int, ...], size: int) -> int:
    n = 1
    for d, c, s in zip(shape, chunks, start):
        lo, hi = max(s, 0), min(s + size, d)
        n *= (hi - 1) // c - lo // c + 1 if hi > lo else 0
    return n


def warm(store: PatchStore, reference: ReferenceReader, rounds: list[list], patch: int) -> tuple[float, float]:
    """Reads/s of (reference, ours): each patch is read by both, one right after the other, the
    first alternating, so a busy machine slows both alike."""
    spent = [0.0, 0.0]
    for jobs in rounds:
        for n, (k, start) in enumerate(jobs):
            for i in (n % 2, 1 - n % 2):
                t0 = time.perf_counter()
                (reference, store)[i].read_patch(k, start, patch)
                spent[i] += time.perf_counter() - t0
    reads = sum(len(jobs) for jobs in rounds)
    return reads / spent[0], reads / spent[1]


def cold(read: object, paths: list[Path], jobs: list) -> tuple[float, float]:
    """(reads/s, MB read from disk per read) with each file evicted right before its read."""
    seconds, disk = 0.0, 0
    for k, start in jobs:
        evict(paths[k])
        before = read_bytes()
        t0 = time.perf_counter()
        read(k, start)
        seconds += time.perf_counter() - t0
        disk += read_bytes() - before
    return len(jobs) / seconds, disk / len(jobs) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, default=160)
    parser.add_argument("--reads", type=int, default=60, help="random patches per warm round")
    parser.add_argument("--files", type=int, default=96, help="volumes in the store (copies of 3 real ones)")
    parser.add_argument("--max-open", type=int, default=64, help="our reader's descriptor bound (data.max_open_files)")
    parser.add_argument("--cold-reads", type=int, default=12, help="cold patch reads per format")
    parser.add_argument("--chunk", type=int, default=64, help="b2nd chunk edge (blocks: half of it)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the store (default: a temporary folder)")
    args = parser.parse_args()
    vols = [v.astype(STORE_DTYPE) for v in demo_volumes()]
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        ids = [f"copy{i:04d}" for i in range(args.files)]
        npy = [write_volume(root, uid, vols[i % 3]) for i, uid in enumerate(ids)]
        write_index(root, ids, [vols[i % 3].shape for i in range(args.files)], [0.0] * args.files, ["T1w"] * args.files)
        b2 = []
        for i, v in enumerate(vols):
            q = root / f"v{i}.b2nd"
            blosc2.asarray(
                np.ascontiguousarray(v), urlpath=str(q), mode="w", chunks=(args.chunk,) * 3,
                blocks=(args.chunk // 2,) * 3, cparams={"codec": blosc2.Codec.ZSTD, "clevel": 5},
            )
            b2.append(q)
        rates = {}
        for files in (3, args.files):  # all stay open; more than our reader keeps open
            rounds = []
            for epoch in range(5):  # round 0 warms up: every map opened once, page tables filled
                ks = rng.integers(files, size=args.reads)
                rounds.append([(int(k), draw_patch_start(vols[k % 3].shape, args.patch, (0, epoch, r))) for r, k in enumerate(ks)])
            store = PatchStore(root, max_open=args.max_open)
            reference = ReferenceReader(npy)
            warm(store, reference, rounds[:1], args.patch)
            rates[files] = (*warm(store, reference, rounds[1:], args.patch), len(reference.maps))
            store.close()
            reference.maps.clear()
        jobs = rounds[1]
        arrays = [blosc2.open(str(q), mode="r") for q in b2]
        t0 = time.perf_counter()
        for k, start in jobs:
            cut_patch(arrays[k % 3], start, args.patch, 0.0)
        b2_warm = len(jobs) / (time.perf_counter() - t0)
        assert np.array_equal(store.read_patch(0, jobs[0][1], args.patch), cut_patch(arrays[0], jobs[0][1], args.patch, 0.0))

        cold_jobs = jobs[: args.cold_reads]

        def npy_read(k: int, start: tuple[int, int, int], advice: int | None = None) -> None:
            vol = map_npy(npy[k])
            if advice is not None:
                vol.base.madvise(advice)
            cut_patch(vol, start, args.patch, 0.0)

        b2_files = [b2[k % 3] for k in range(args.files)]
        npy_cold = cold(npy_read, npy, cold_jobs)
        random_cold = cold(lambda k, s: npy_read(k, s, mmap.MADV_RANDOM), npy, cold_jobs)
        b2_cold = cold(lambda k, s: cut_patch(blosc2.open(str(b2_files[k]), mode="r"), s, args.patch, 0.0), b2_files, cold_jobs)
        ahead = read_ahead(root)
        disk_npy = npy[0].stat().st_size
        disk_b2 = sum(q.stat().st_size for q in b2) / 3
        touched = np.mean([chunks_touched(vols[k % 3].shape, (args.chunk,) * 3, s, args.patch) for k, s in jobs])
        chunk_bytes = disk_b2 * 3 / sum(np.prod([-(-d // args.chunk) for d in v.shape]) for v in vols)
        patch_bytes = np.mean([np.prod([min(s + args.patch, d) - max(s, 0) for s, d in zip(st, vols[k % 3].shape)]) for k, st in jobs]) * 2
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.files} volumes {vols[0].shape} float16 (copies of 3 real ones), {args.patch}^3 patches, {os.cpu_count()} cores")
    print(f"warm page cache, random volume and patch per read ({args.reads} reads x 4 rounds, after one warm-up round):")
    for files, (ref_rate, ours_rate, ref_maps) in rates.items():
        print(f"  {files} volumes: reference (every volume mapped once, kept: {ref_maps} maps) {ref_rate:7.1f} reads/s,"
              f" ours (<= {args.max_open} descriptors) {ours_rate:7.1f} reads/s: ours/reference {ours_rate / ref_rate:.3f}")
    print(f"  b2nd (ZSTD, {args.chunk}^3 chunks, opened once)          {b2_warm:8.1f} reads/s")
    print(f"cold (file evicted before each of {len(cold_jobs)} reads): reads/s, MB read from disk per pair")
    print(f"  npy mmap, kernel read-ahead ({ahead})    {npy_cold[0]:8.1f}   {npy_cold[1]:7.2f} MB")
    print(f"  npy mmap, MADV_RANDOM                  {random_cold[0]:8.1f}   {random_cold[1]:7.2f} MB")
    print(f"  b2nd                                   {b2_cold[0]:8.1f}   {b2_cold[1]:7.2f} MB")
    print(f"patch bytes (uncompressed) {patch_bytes / 1e6:.2f} MB; estimated b2nd chunk bytes {touched * chunk_bytes / 1e6:.2f} MB;"
          f" on disk per volume: npy {disk_npy / 1e6:.1f} MB, b2nd {disk_b2 / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
