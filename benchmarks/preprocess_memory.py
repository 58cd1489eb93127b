"""Preprocessing per worker: peak memory against the volume's size, and volumes/s per core.

Memory: a fresh worker process (SimpleITK on one thread, as `data preprocess -j N` runs them)
preprocesses one synthetic 512 x 512 x 300 float32 head with a noisy, non-zero background (nothing
to crop for `nonzero`), stored as an uncompressed NIfTI, for each case (voxel size, foreground):
1.0 mm (no resampling) and 0.9 mm (B-spline to 1 mm). After a warm-up on a small volume it resets
its peak RSS, so it reports the RSS before reading (interpreter, libraries), the peak RSS (VmHWM)
and the ratio of their difference to the volume's float32 size. Throughput: a real 1 mm head (nilearn's MNI152 T1
template, 197 x 233 x 189, .nii.gz) preprocessed repeatedly in one process on one core, against the
input/output floor (read the same file, write its float16 `.npy`) in the same process.

    python benchmarks/preprocess_memory.py                      # ~2-4 minutes on 2 cores
    python benchmarks/preprocess_memory.py --shape 256 256 150 --repeats 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_simclr.data.manifest import ManifestImage  # noqa: E402
from ds_simclr.data.preprocess import IMAGES_DIR, Plan, process_image  # noqa: E402
from ds_simclr.data.store import STORE_DTYPE  # noqa: E402
from ds_simclr.data.volume_io import read_volume  # noqa: E402

MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _item(path: Path, uid: str) -> ManifestImage:
    return ManifestImage(uid, "bench", uid, "ses-1", path, "T1w", None, f"image {uid}")


def synthetic_head(path: Path, shape: tuple[int, int, int], spacing: float, seed: int = 0) -> int:
    """Write an ellipsoidal head (scalp, dark skull, brain) over Rician-like noise; returns its bytes."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    r2 = np.zeros(shape, np.float32)
    for k, a in enumerate(axes):
        r2 += (a.reshape([-1 if j == k else 1 for j in range(3)]) / 0.8) ** 2
    data = np.abs(rng.standard_normal(shape, dtype=np.float32)) * np.float32(20.0)
    data[r2 < 1.0] += 850.0
    data[r2 < 0.8] -= 700.0
    data[r2 < 0.65] += 450.0
    del r2
    img = nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return data.nbytes


def _memory_worker(path: str, spacing: float, foreground: str, out: str) -> dict[str, float]:
    """In a fresh process: warm up on a small volume (libraries and code paths loaded), reset the
    peak RSS (/proc/self/clear_refs), then preprocess `path` and read the peak."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    (Path(out) / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    warm = Path(out) / "warm.nii"
    synthetic_head(warm, (48, 48, 40), spacing)
    process_image(_item(warm, "warm"), Plan(foreground=foreground), Path(out))
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    record = process_image(_item(Path(path), "head"), Plan(foreground=foreground), Path(out))
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - start_cpu,
        "before_mib": before / 1024,
        "peak_mib": _status_kib("VmHWM") / 1024,
        "out_shape": record["shape"],
        "mode": record["resampling"]["mode"],
    }


def measure(path: Path, spacing: float, foreground: str, out: Path) -> dict[str, float]:
    """`_memory_worker` in a spawned process (the way `data preprocess -j N` starts workers)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_memory_worker, (str(path), spacing, foreground, str(out)))


def memory(shape: tuple[int, int, int], spacings: list[float], foregrounds: list[str], tmp: Path) -> None:
    print(f"memory per worker, synthetic head {shape[0]} x {shape[1]} x {shape[2]} float32")
    print(f"{'voxel':>6} {'foreground':>10} {'resampling':>12} {'output':>16} {'before':>9} {'peak':>9} {'(peak-before)/volume':>21} {'CPU time':>9}")
    for spacing in spacings:
        path = tmp / f"head_{spacing}.nii"
        nbytes = synthetic_head(path, shape, spacing)
        for foreground in foregrounds:
            r = measure(path, spacing, foreground, tmp / f"out_{spacing}_{foreground}")
            ratio = (r["peak_mib"] - r["before_mib"]) * MIB / nbytes
            print(
                f"{spacing:>4} mm {foreground:>10} {r['mode']:>12} {'x'.join(map(str, r['out_shape'])):>16}"
                f" {r['before_mib']:>6.0f} MiB {r['peak_mib']:>5.0f} MiB {ratio:>17.2f} x {nbytes / MIB:.0f} MiB {r['cpu_seconds']:>8.1f}s",
                flush=True,
            )
        path.unlink()


def _io_floor(path: Path, out: Path) -> None:
    vol = read_volume(path)
    np.save(out, vol.array.astype(STORE_DTYPE))


def throughput(repeats: int, tmp: Path) -> None:
    import SimpleITK as sitk
    from nilearn.datasets import load_mni152_template

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    path = tmp / "mni152_t1_1mm.nii.gz"
    nib.save(load_mni152_template(resolution=1), str(path))
    (tmp / "tp" / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    runs = {
        "read + write only": lambda: _io_floor(path, tmp / "tp" / "floor.npy"),
        "preprocess, nonzero": lambda: process_image(_item(path, "mni"), Plan(), tmp / "tp"),
        "preprocess, otsu": lambda: process_image(_item(path, "mni"), Plan(foreground="otsu"), tmp / "tp"),
    }
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # alternate, so a busy machine slows every variant alike
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    floor = float(np.median(cpu["read + write only"]))
    print(f"\nthroughput, one core, 1 mm head (MNI152 T1 {nib.load(str(path)).shape}), median of {repeats}")
    print("(CPU seconds of this one-threaded process; wall seconds too, which a busy machine inflates)")
    for name in runs:
        c, w = float(np.median(cpu[name])), float(np.median(wall[name]))
        print(f"{name:>22}: {c:6.2f} CPU s/volume = {1 / c:6.2f} volumes/s per core ({c / floor:4.1f}x the read + write floor), wall {w:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), help="synthetic volume (voxels)")
    parser.add_argument("--spacing", type=float, nargs="+", default=(1.0, 0.9), help="voxel sizes (mm) of the synthetic volume")
    parser.add_argument("--foreground", nargs="+", default=("nonzero", "otsu"), help="foregrounds to measure memory with")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant on the 1 mm head")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_memory:
            memory(tuple(args.shape), list(args.spacing), list(args.foreground), Path(tmp))
        if not args.skip_throughput:
            throughput(args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
