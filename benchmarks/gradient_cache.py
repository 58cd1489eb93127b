"""Gradient cache: peak memory and time per optimizer step against plain accumulation and one big micro-batch.

For each global batch G (pairs per optimizer step) three ways of running one rank's steps through the real
`Trainer._optimizer_step` (DeepSpeed engine on this machine, ZeRO-1, fp32) on the demo MRI store:
- `cache`:        micro 4 x accumulation G/4 with `train.gradient_cache` (2G - 2 negatives per anchor);
- `accumulation`: micro 4 x accumulation G/4 without it (6 negatives per anchor): the reference for time;
- `one batch`:    micro G x accumulation 1 (2G - 2 negatives, every activation at once), up to --full-max.
The encoder is `resenc_tiny` at --size^3 with a 256-256-128 head; views come from the real loader (the
cache makes each micro-batch's views twice, and that is timed too).

Memory: every configuration runs in its own process (so none inherits another's heap), with glibc's
mmap threshold pinned at 1 MiB so freed tensors leave the resident set. After one warm-up step (it
creates the Adam state), the kernel's peak-RSS mark is reset (/proc/self/clear_refs); "step MiB" is the
peak resident set during the timed steps minus the resident set before them: what a step needs on
top of the model, its gradients and the optimizer state. Time: seconds per optimizer step, wall clock
and CPU (all threads of the process; on a shared machine the CPU seconds are the steadier figure).
Run: `python benchmarks/gradient_cache.py [--globals 8 32 128] [--full-max 32] [--modes cache accumulation]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
MODES = ("cache", "accumulation", "one batch")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _spec_mapping(mode: str, global_batch: int, micro: int, size: int, cache: Path, out: Path) -> dict:
    split = {"micro_batch": global_batch, "grad_accum": 1} if mode == "one batch" else {
        "micro_batch": micro, "grad_accum": global_batch // micro, "gradient_cache": mode == "cache"}
    return {
        "name": "bench",
        "output_dir": str(out),
        "data": {"demo": True, "cache_dir": str(cache), "patch_size": size + size // 4, "num_workers": 1,
                 "prefetch": 1},
        "views": {"output_size": size, "crop_min": size * 3 // 4},
        "model": {"encoder": "resenc_tiny", "head_hidden": 256, "head_out": 128, "head_layers": 3},
        "schedule": {"warmup_steps": 0},
        "train": {"global_batch": global_batch, "steps_per_epoch": 100, "precision": "fp32", **split},
        "distributed": {"backend": "gloo"},
        "logging": {"wandb_mode": "disabled"},
    }


def measure_one(mode: str, global_batch: int, micro: int, size: int, steps: int, cache: Path) -> dict:
    """In this process: build the Trainer, warm up one step, then time `steps` steps and take the peak."""
    from ds_simclr.engine import Trainer
    from ds_simclr.specload import spec_from_mapping

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(spec_from_mapping(_spec_mapping(mode, global_batch, micro, size, cache, Path(out))))
        stream = trainer.loader.iterate(0)
        wall, cpu = [], []
        for index in range(steps + 1):
            if index == 1:  # after the warm-up step: reset the peak mark, remember the resident set
                Path("/proc/self/clear_refs").write_text("5")
                base = _status_kib("VmRSS")
            start, start_cpu = time.perf_counter(), time.process_time()
            row = trainer._optimizer_step(stream)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            trainer.state.step += 1
        peak = _status_kib("VmHWM")
        trainer.loader.close()
    return {
        "mode": mode, "global": global_batch, "micro": trainer.batch.micro_batch, "accum": trainer.batch.grad_accum,
        "negatives": trainer.batch.negatives_per_anchor, "loss": row["loss"], "step_s": statistics.median(wall[1:]),
        "cpu_s": statistics.median(cpu[1:]), "step_bytes": (peak - base) * 1024, "rss_bytes": peak * 1024,
    }


def run_one(mode: str, global_batch: int, args: argparse.Namespace) -> dict:
    """`measure_one` in a fresh process with a pinned mmap threshold (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MiB), DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO),
               OMP_NUM_THREADS=str(args.threads), WANDB_SILENT="true")
    cmd = [sys.executable, __file__, "--one", mode, str(global_batch), "--micro", str(args.micro), "--size",
           str(args.size), "--steps", str(args.steps), "--cache", str(args.cache)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {global_batch}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--globals", type=int, nargs="+", default=[8, 32, 128], help="global batches (pairs)")
    parser.add_argument("--micro", type=int, default=4, help="pairs per micro-batch with accumulation")
    parser.add_argument("--full-max", type=int, default=32, help="largest global batch run as one micro-batch")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="which ways to run a step")
    parser.add_argument("--size", type=int, default=32, help="view edge (voxels)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ds_simclr_bench",
                        help="where the demo store is built once (the Trainer needs a store)")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "GLOBAL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        mode, global_batch = args.one[0], int(args.one[1])
        print(json.dumps(measure_one(mode, global_batch, args.micro, args.size, args.steps, args.cache)))
        return

    sys.path.insert(0, str(REPO))
    from ds_simclr.data.demo import ensure_demo_store

    ensure_demo_store(args.cache)
    print(f"resenc_tiny at {args.size}^3, fp32, 1 rank, {args.threads} torch thread(s); step MiB = peak RSS of a step"
          " above the resident model and optimizer state; s = median seconds per optimizer step (wall, CPU)")
    print(f"{'G':>5} | {'mode':<12} {'split':>7} {'negatives':>9} {'step MiB':>9} {'wall s':>7} {'CPU s':>7} |"
          " memory ratio                        | time ratio (wall, CPU)")
    results: dict[tuple[str, int], dict] = {}
    for global_batch in args.globals:
        for mode in args.modes:
            if mode == "one batch" and global_batch > args.full_max:
                continue
            results[mode, global_batch] = result = run_one(mode, global_batch, args)
            cached = results.get(("cache", global_batch))
            first = results.get(("cache", args.globals[0]))
            ratio = timing = ""
            if mode == "cache" and first:
                ratio = f"cache / cache at G={args.globals[0]}: {result['step_bytes'] / first['step_bytes']:.2f}"
            elif mode != "cache" and cached:
                ratio = f"{mode} / cache: {result['step_bytes'] / cached['step_bytes']:.2f}"
            if mode == "accumulation" and cached:
                timing = (f"cache / accumulation: {cached['step_s'] / result['step_s']:.2f}x,"
                          f" {cached['cpu_s'] / result['cpu_s']:.2f}x")
            print(f"{global_batch:>5} | {mode:<12} {result['micro']:>3}x{result['accum']:<3} {result['negatives']:>9}"
                  f" {result['step_bytes'] / MiB:>9.1f} {result['step_s']:>7.2f} {result['cpu_s']:>7.2f} |"
                  f" {ratio:<35} | {timing}", flush=True)
    if all((mode, g) in results for mode in ("cache", "accumulation") for g in args.globals):
        cached = [results["cache", g]["step_bytes"] for g in args.globals]
        wall = [results["cache", g]["step_s"] / results["accumulation", g]["step_s"] for g in args.globals]
        cpu = [results["cache", g]["cpu_s"] / results["accumulation", g]["cpu_s"] for g in args.globals]
        print(f"memory with the cache from G={args.globals[0]} to G={args.globals[-1]}: x{cached[-1] / cached[0]:.2f}"
              f" (goal: within 10 %); time with the cache / plain accumulation: max {max(wall):.2f}x wall,"
              f" {max(cpu):.2f}x CPU (goal <= 1.5x)")

if __name__ == "__main__":
    main()
