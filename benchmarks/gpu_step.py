"""One SimCLR training step on one GPU: pairs/s and model FLOP utilisation, across variants.

Measures the model side only (views are synthetic and already on the device): forward of both
views, NT-Xent, backward, AdamW step, with the module cast to bf16 as DeepSpeed bf16 does.
Variants: baseline, channels_last_3d, cudnn.benchmark, torch.compile; each runs in its own
try-block so one failure does not hide the others. Imports only torch and ds_simclr's torch-only
model/loss (the lent GPU machine has nothing else).

MFU uses the seed's count: 11.45 TFLOP per 160^3 ResEnc-L pair (forward + backward of two views),
scaled by (size / 160)^3 for other sizes, against 989 TFLOP/s dense bf16 (H100 SXM); other
encoders print nan for TFLOP/s and MFU.

    python benchmarks/gpu_step.py --batch 8                   # on the GPU
    python benchmarks/gpu_step.py --device cpu --encoder resenc_tiny --size 32 --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_simclr.loss import nt_xent  # noqa: E402
from ds_simclr.model import build_model, count_parameters  # noqa: E402

TFLOP_PER_PAIR_160 = 11.45
PEAK_TFLOPS = 989.0
VARIANTS = ("baseline", "channels_last_3d", "cudnn_benchmark", "compile")


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(variant: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Build a fresh model for `variant`, warm up, then time `args.steps` optimizer steps."""
    torch.manual_seed(0)
    model = build_model(args.encoder, head_hidden=args.head_hidden, head_out=args.head_out)
    model = model.to(device=device, dtype=torch.bfloat16)
    channels_last = variant == "channels_last_3d" or (variant == "compile" and args.compile_channels_last)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    forward = torch.compile(model) if variant == "compile" else model

    shape = (args.batch, 1, args.size, args.size, args.size)
    views = [torch.randn(shape, device=device, dtype=torch.bfloat16).to(memory_format=memory_format) for _ in range(2)]

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = nt_xent(forward(views[0]), forward(views[1]), args.temperature)
        loss.backward()
        optimizer.step()
        return loss.detach()

    with cudnn_benchmark(variant in ("cudnn_benchmark", "compile") or args.cudnn_benchmark_all):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        _sync(device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        _sync(device)
        elapsed = time.perf_counter() - start
    pairs_per_s = args.batch * args.steps / elapsed
    # The FLOP count is ResEnc-L's; other encoders report nan rather than a wrong number.
    tflop_per_pair = TFLOP_PER_PAIR_160 * (args.size / 160) ** 3 if args.encoder == "resenc_l" else float("nan")
    result = {
        "step_ms": 1e3 * elapsed / args.steps,
        "pairs_per_s": pairs_per_s,
        "tflops": pairs_per_s * tflop_per_pair,
        "mfu": pairs_per_s * tflop_per_pair / PEAK_TFLOPS,
        "warmup_s": warmup_s,
        "loss": float(loss),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
    }
    del model, optimizer, forward, views
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--encoder", default="resenc_l")
    parser.add_argument("--size", type=int, default=160, help="cubic view size (voxels per axis)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step on this GPU")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--head-hidden", type=int, default=2048)
    parser.add_argument("--head-out", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--compile-channels-last", action="store_true", help="compile the channels_last_3d model")
    parser.add_argument("--cudnn-benchmark-all", action="store_true", help="cudnn.benchmark in every variant")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu x{torch.get_num_threads()} threads"
    n_params = count_parameters(build_model(args.encoder, head_hidden=args.head_hidden, head_out=args.head_out))
    print(f"{name} | torch {torch.__version__} | {args.encoder} ({n_params / 1e6:.1f} M params) | "
          f"{args.size}^3 bf16 | batch {args.batch} pairs | {args.steps} steps after {args.warmup} warm-up", flush=True)
    results: dict[str, dict[str, float]] = {}
    for variant in args.variants:
        try:
            results[variant] = run_variant(variant, args, device)
            r = results[variant]
            print(f"  {variant:<17} {r['step_ms']:9.1f} ms/step {r['pairs_per_s']:8.2f} pairs/s "
                  f"{r['tflops']:8.1f} TFLOP/s  MFU {100 * r['mfu']:5.1f} %  peak {r['peak_gib']:5.1f} GiB  "
                  f"warm-up {r['warmup_s']:6.1f} s  loss {r['loss']:.4f}", flush=True)
        except Exception as exc:  # one variant's failure (OOM, compiler) must not hide the others
            print(f"  {variant:<17} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  flush=True)
            traceback.print_exc(limit=3, file=sys.stdout)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = results.get("baseline")
    if base:
        print("speed-up over baseline: " + ", ".join(
            f"{v} {r['pairs_per_s'] / base['pairs_per_s']:.2f}x" for v, r in results.items() if v != "baseline"))
    print("reference: the seed measured ~6.2 pairs/s per GPU (71 TFLOP/s, ~7 % MFU) end to end at 160^3")


if __name__ == "__main__":
    main()
