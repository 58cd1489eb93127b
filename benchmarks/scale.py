"""The data path at N tiny volumes: time per volume and peak memory of every stage, N = 1k, 10k, 50k.

For each N: write N tiny synthetic volumes (NIfTI, 12^3 at 2 mm) and their pretrain_data.json, then
time, each in a fresh process:

- preprocess   `preprocess()` with 2 processes (wall and CPU seconds; main process and largest worker peak RSS)
- rerun        the same call again: every image reused, the index rewritten
- open         `PatchStore(store)` as a rank opens it (seconds, RSS it adds)
- first step   `ds_simclr launch` (2 CPU ranks, tiny encoder, 16^3 views) until step 1 is in
               metrics.jsonl: data check, rank start-up, DeepSpeed, store open, first batch, one step

and prints a table of milliseconds per volume, wall and CPU (user + system of the stage's
processes, which the other jobs of a busy machine do not inflate), the ratio of each stage's time
per volume at the largest N to that at the smallest (goal <= 1.1), and launch to first step at the
largest N (goal < 30 s). It also opens the index of 114,000 volumes (OpenMind's size; index only).

    python benchmarks/scale.py                  # N = 1000 10000 50000 (about an hour on 2 busy cores)
    python benchmarks/scale.py --sizes 200 1000 # fewer
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OPENMIND = 114_000
STAGES = ("preprocess", "rerun", "open", "first step")


def _rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def _cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def launch_spec(root: Path, store: Path) -> Path:
    import yaml

    spec = {
        "name": "scale", "seed": 0, "output_dir": str(root / "runs"),
        "data": {"store": str(store), "patch_size": 16, "num_workers": 1},
        "views": {"output_size": 16, "crop_min": 8},
        "model": {"encoder": "resenc_tiny", "head_hidden": 32, "head_out": 16, "head_layers": 2},
        "train": {"global_batch": 16, "steps_per_epoch": 100, "max_steps": 1, "precision": "fp32"},
        "distributed": {"launcher": "torchrun", "nodes": 1, "procs_per_node": 2},
        "checkpoint": {"every_steps": 1000, "keep_last": 1},
        "logging": {"wandb_mode": "disabled", "log_every": 1},
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def stage(name: str, root: Path) -> dict:
    """Run one stage in this (fresh) process; returns seconds and memory."""
    manifest, store = root / "raw" / "pretrain_data.json", root / "store"
    if name in ("preprocess", "rerun"):
        from ds_simclr.data.preprocess import preprocess

        before, cpu = _current_rss_mb(), _cpu_s()
        t0 = time.perf_counter()
        report = preprocess(manifest, store, jobs=2, progress=False)
        seconds = time.perf_counter() - t0
        assert len(report.processed if name == "preprocess" else report.reused) == report.store_size, report.summary()
        return {"seconds": seconds, "cpu_s": _cpu_s() - cpu + _cpu_s(resource.RUSAGE_CHILDREN),
                "rss_mb": _rss_mb() - before, "workers_rss_mb": _rss_mb(resource.RUSAGE_CHILDREN)}
    if name in ("open", "open 114k"):
        from ds_simclr.data.store import PatchStore

        before, cpu = _current_rss_mb(), _cpu_s()
        t0 = time.perf_counter()
        opened = PatchStore(root / "openmind" if name == "open 114k" else store)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "cpu_s": _cpu_s() - cpu, "rss_mb": _rss_mb() - before, "volumes": len(opened)}
    if name == "first step":
        spec = launch_spec(root, store)
        metrics = root / "runs" / "scale" / "metrics.jsonl"
        shutil.rmtree(root / "runs", ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "ds_simclr.cli", "launch", str(spec)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=(root / "launch.log").open("w"))
        while not (metrics.is_file() and metrics.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"launch ended without a step:\n{(root / 'launch.log').read_text()[-3000:]}")
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        if proc.wait() != 0:
            raise RuntimeError((root / "launch.log").read_text()[-3000:])
        return {"seconds": seconds, "cpu_s": _cpu_s(resource.RUSAGE_CHILDREN), "rss_mb": _rss_mb(resource.RUSAGE_CHILDREN)}
    raise ValueError(name)


def run_stage(name: str, root: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--stage", name, "--root", str(root)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"})
    if out.returncode != 0:
        raise RuntimeError(f"stage {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(n: int, base: Path) -> dict:
    from ds_simclr.data.synthetic import write_tiny_collection

    root = base / f"n{n}"
    t0, cpu = time.perf_counter(), _cpu_s()
    write_tiny_collection(root / "raw", n)
    rows = {"generate": {"seconds": time.perf_counter() - t0, "cpu_s": _cpu_s() - cpu}}
    for name in STAGES:
        rows[name] = run_stage(name, root)
        print(f"  N={n} {name}: {rows[name]}", file=sys.stderr, flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return rows


def openmind_index(base: Path) -> dict:
    from ds_simclr.data.store import write_index

    root = base / "openmind114k"
    modalities = ["T1w", "T2w", "FLAIR"] * (OPENMIND // 3)
    ids = [f"OpenMind__Dataset{k % 800:03d}__sub-{k:06d}__ses-1__{m}" for k, m in enumerate(modalities)]
    write_index(root / "openmind", ids, [(180, 220, 190)] * OPENMIND, [-1.5] * OPENMIND, modalities)
    row = run_stage("open 114k", root)
    shutil.rmtree(root, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, args.root)))
        return
    base = Path(tempfile.mkdtemp(prefix="ds_simclr_scale_", dir=args.dir))
    load = os.getloadavg()
    try:
        results = {n: measure(n, base) for n in args.sizes}
        openmind = openmind_index(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    small, large = min(args.sizes), max(args.sizes)
    print(f"{os.cpu_count()} cores, load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}")
    print("| stage | " + " | ".join(f"N = {n:,}" for n in args.sizes) + f" | per volume {large:,} / {small:,}: wall, CPU |")
    print("|---|" + "---|" * len(args.sizes) + "---|")
    for name in ("generate (input)", *STAGES):
        cells = []
        for n in args.sizes:
            row = results[n][name.split(" (")[0]]
            mem = f", {row['rss_mb']:.0f} MB" if "rss_mb" in row else ""
            if "workers_rss_mb" in row:
                mem += f" (workers {row['workers_rss_mb']:.0f} MB)"
            cells.append(f"{row['seconds']:.2f} s = {1e3 * row['seconds'] / n:.3f} ms/vol, CPU {1e3 * row['cpu_s'] / n:.3f} ms/vol{mem}")
        most, few = results[large][name.split(" (")[0]], results[small][name.split(" (")[0]]
        wall = (most["seconds"] / large) / (few["seconds"] / small)
        cpu = (most["cpu_s"] / large) / max(few["cpu_s"] / small, 1e-12)
        print(f"| {name} | " + " | ".join(cells) + f" | {wall:.2f}x, {cpu:.2f}x |")
    first = results[large]["first step"]["seconds"]
    print(f"launch to first step (store open by both ranks included) at N = {large:,}: {first:.1f} s (goal < 30 s)")
    print(f"store open at {OPENMIND:,} volumes (index only): {openmind['seconds']:.2f} s, +{openmind['rss_mb']:.0f} MB"
          " (goal < 2 s, < 200 MB)")
    print("memory: preprocess/rerun = peak RSS the call added to the main process (workers: largest worker);"
          " open = RSS the open added; first step = largest rank or launcher process. CPU: user + system seconds of"
          " the stage's processes (first step: the whole one-step launch), which a busy machine does not inflate")


if __name__ == "__main__":
    main()
