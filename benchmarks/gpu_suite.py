"""The GPU fast path, measured through the real trainer: pairs/s, MFU, peak memory, data wait, views/s.

On one GPU, ds_simclr's `Trainer` exactly as a run uses it (DeepSpeed engine, ZeRO-1, bf16, gradient
clipping 0.1, NT-Xent, the loader making views on the device) trains on a synthetic store of smooth
random volumes written at start (float16 `.npy`, a little larger than a patch), ResEnc-L at 160^3,
in each configuration of CONFIGS: plain at micro-batch 1, 4 and 8; channels_last and activation
checkpointing at 8; torch.compile at 4 (last: it compiles for a minute or more). Each configuration
is a fresh run directory with `warmup + steps` optimizer steps; the first `warmup` (cuDNN's
algorithm search, compilation) are left out of the figures.

Prints JSON lines on stdout (the trainer's own output goes to stderr): one header, one per
configuration, one for the view maker alone. Per configuration: `pairs_per_s` over the timed steps,
`mfu` = pairs/s x TFLOP per pair / the chip's dense bf16 peak (TFLOP per pair: 11.45 for ResEnc-L
forward + backward of both views at 160^3, scaled by volume; model FLOPs only, so checkpointing's
recomputed forward is not counted), `peak_memory_gib` (torch.cuda.max_memory_allocated) next to
`plan_estimate_gib` (what `ds_simclr plan` estimates for it), `data_wait_fraction` (time the step
waited for its batch / step time), `first_loss` (equal configurations at one micro-batch must agree;
0 at micro-batch 1 on one GPU, where a pair has no negatives, though the work per step is real).
A configuration that fails (out of memory, compiler) prints its error and the suite goes on.

Dense bf16 peaks (NVIDIA data sheets), matched in order on the device name: H100 PCIe 756, H100 NVL
835, H100 989 (SXM), H200 NVL 835, H200 989 (SXM), A100 312 TFLOP/s; others and CPUs: no MFU.

Where only torch is installed (the lent GPU machine): build the wheels here with
`scripts/device_wheels.sh .whl`, carry `.whl`, and there
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --find-links .whl \\
        -r .whl/requirements.txt
    PYTHONPATH=/tmp/site python3 benchmarks/gpu_suite.py | tee $OUT/suite.jsonl   # $OUT: comes back
(not yet timed on a GPU; estimated 4-5 minutes on an H100/H200: per configuration the trainer's
start, 13 steps, the final checkpoint of ~1.4 GB and plots; cuDNN's search per new shape; a minute
or two of compilation).
The CPU proof (tests/test_device_wheels.py):
    python benchmarks/gpu_suite.py --device cpu --encoder resenc_tiny --size 32 --head 32 \\
        --warmup 1 --steps 1 --configs plain@2 channels_last@2 checkpointing@2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

TFLOP_PER_PAIR_160 = 11.45
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("A100", 312.0),
)
CONFIGS = ("plain@1", "plain@4", "plain@8", "channels_last@8", "checkpointing@8", "compile@4")
SPEED_FIELD = {  # configuration name -> the train.* field it switches on
    "plain": None,
    "channels_last": "channels_last",
    "checkpointing": "activation_checkpointing",
    "compile": "compile",
}


def peak_tflops(device: torch.device) -> float | None:
    """The chip's dense bf16 peak from PEAK_BF16_TFLOPS, or None (CPU, unknown chip)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def write_store(root: Path, volumes: int, edge: int, seed: int = 0) -> list[np.ndarray]:
    """A store of smooth random volumes (low-pass noise, z-scored, float16); returns them as float32.

    Written with the store module's own writers (what preprocessing writes).
    """
    from ds_simclr.data.store import write_index, write_volume

    g = torch.Generator().manual_seed(seed)
    coarse = max(4, edge // 8)
    arrays = []
    for i in range(volumes):
        noise = torch.randn(1, 1, coarse, coarse, coarse, generator=g)
        vol = F.interpolate(noise, size=(edge,) * 3, mode="trilinear", align_corners=False)[0, 0]
        vol = ((vol - vol.mean()) / vol.std()).numpy()
        write_volume(root, f"syn{i:03d}", vol)
        arrays.append(vol)
    ids = [f"syn{i:03d}" for i in range(volumes)]
    write_index(root, ids, [a.shape for a in arrays], [float(a.min()) for a in arrays], ["T1w"] * volumes)
    return arrays


def suite_spec(config: str, micro: int, store: Path, out: Path, args: argparse.Namespace) -> Any:
    """The run spec of one configuration, as a user would write it."""
    from ds_simclr.specload import spec_from_mapping

    train = {
        "global_batch": micro, "micro_batch": micro, "grad_accum": 1, "steps_per_epoch": 1000,
        "max_steps": args.warmup + args.steps, "grad_clip": 0.1, "precision": "bf16", "zero_stage": 1,
    }
    if SPEED_FIELD[config]:
        train[SPEED_FIELD[config]] = True
    return spec_from_mapping(
        {
            "name": f"{config}-{micro}",
            "output_dir": str(out),
            "data": {"store": str(store), "patch_size": args.size, "num_workers": 4, "prefetch": 2},
            "views": {"output_size": args.size, "crop_min": min(60, args.size)},
            "model": {"encoder": args.encoder, "head_hidden": args.head, "head_out": args.head},
            "optimizer": {"lr": 3e-4},
            "train": train,
            "checkpoint": {"every_steps": 10**6, "keep_last": 1},
            "logging": {"wandb_mode": "disabled", "log_every": 1},
        },
        where=f"gpu_suite:{config}@{micro}",
    )


def train_steps(spec: Any) -> list[dict[str, Any]]:
    """Train `spec` with the real Trainer (its output to stderr); the metrics row of every step.

    The suite's one coupling to the engine: adjust here when the Trainer's interface changes.
    """
    from ds_simclr.engine import Trainer
    from ds_simclr.telemetry import read_metrics

    with contextlib.redirect_stdout(sys.stderr):
        Trainer(spec, spec.run_dir).run()
    return read_metrics(spec.run_dir / "metrics.jsonl")


def measure(config: str, micro: int, store: Path, out: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """One configuration's JSON record."""
    from ds_simclr.dsconfig import plan_batch
    from ds_simclr.planning import memory_estimate

    spec = suite_spec(config, micro, store, out, args)
    record: dict[str, Any] = {"config": config, "micro_batch": micro}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        record["memory_at_start_gib"] = torch.cuda.memory_allocated(device) / 2**30
    t0 = time.perf_counter()
    rows = train_steps(spec)
    timed = rows[args.warmup :]
    step_s = sum(r["time_step_s"] for r in timed)
    pairs_per_s = micro * len(timed) / step_s
    tflop = TFLOP_PER_PAIR_160 * (args.size / 160) ** 3 if args.encoder == "resenc_l" else None
    peak = peak_tflops(device)
    record.update(
        pairs_per_s=pairs_per_s,
        step_s=step_s / len(timed),
        tflops=pairs_per_s * tflop if tflop else None,
        mfu=pairs_per_s * tflop / peak if tflop and peak else None,
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        plan_estimate_gib=memory_estimate(spec, plan_batch(spec, 1)).total / 2**30,
        data_wait_fraction=sum(r["time_data_s"] for r in timed) / step_s,
        first_loss=rows[0]["loss"],
        steps_timed=len(timed),
        warmup_s=sum(r["time_step_s"] for r in rows[: args.warmup]),
        wall_s=time.perf_counter() - t0,
    )
    return record


def views_per_s(volumes: list[np.ndarray], args: argparse.Namespace, device: torch.device) -> dict:
    """The view maker alone on the device (`ds_simclr bench views` without the MONAI comparison)."""
    from ds_simclr.data.bench import bench_views
    from ds_simclr.data.options import ViewsSpec

    views = ViewsSpec(output_size=args.size, crop_min=min(60, args.size))
    result = bench_views(
        views, device=str(device), patch_size=args.size, batch=8, seconds=args.views_seconds,
        compare_monai=False, volumes=volumes,
    )
    return {"config": "views", "views_per_s": result.ours_views_per_s, "batch": result.batch}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--encoder", default="resenc_l")
    parser.add_argument("--size", type=int, default=160, help="patch and view edge (voxels)")
    parser.add_argument("--head", type=int, default=2048, help="projection head width (nnSSL: 2048)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps per configuration")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per configuration")
    parser.add_argument("--volumes", type=int, default=16, help="volumes in the synthetic store")
    parser.add_argument("--views-seconds", type=float, default=5.0)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"NAME@MICRO; names: {', '.join(SPEED_FIELD)}")
    args = parser.parse_args()
    configs = [(name, int(micro)) for name, _, micro in (c.partition("@") for c in args.configs)]
    if any(name not in SPEED_FIELD for name, _ in configs):
        parser.error(f"--configs: names are {', '.join(SPEED_FIELD)}")
    if (args.device == "cuda") != torch.cuda.is_available():
        parser.error("--device cuda needs a visible GPU; for --device cpu hide it (CUDA_VISIBLE_DEVICES=)")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its accelerator detection logs to stdout
        import deepspeed

    header = {
        "suite": "gpu_suite",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "peak_bf16_tflops": peak_tflops(device),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
        **{key: getattr(args, key) for key in ("encoder", "size", "warmup", "steps")},
    }
    print(json.dumps(header), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_suite-") as tmp:
        store, out = Path(tmp) / "store", Path(tmp) / "runs"
        volumes = write_store(store, args.volumes, args.size + args.size // 10)
        for name, micro in configs:
            try:
                record = measure(name, micro, store, out, args, device)
            except Exception as exc:  # one configuration's failure (out of memory, compiler) must not hide the others
                first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
                record = {"config": name, "micro_batch": micro, "error": f"{type(exc).__name__}: {first_line}"}
            print(json.dumps(record), flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(views_per_s(volumes, args, device)), flush=True)
    print(json.dumps({"suite": "done", "wall_s": time.perf_counter() - started}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
