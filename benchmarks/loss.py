"""NT-Xent forward+backward: ds_simclr.loss.nt_xent against a plain full-matrix reference.

Two references, both single-process on the whole batch:
- `full`: the plain formulation, a full 2N x 2N similarity matrix (one matmul), positives and
  negatives picked out with a boolean mask, cross-entropy over [positive, negatives].
- `seed`: the seed's NTXentLoss shape: cosine similarity by broadcasting, which materialises a
  (2N, 2N, D) tensor (and more in backward); run only while (2N)^2 D <= --seed-max-elems.
In one process ours does the same O(N^2) work as `full`; its gain there is avoiding the mask copy.
On W ranks ours builds only (2n x 2N) logits per rank, 1/W of this. Ratios are reference / ours.

Memory: on CUDA, torch.cuda.max_memory_allocated. On CPU, torch's allocations are invisible to
tracemalloc, so we report the peak RSS growth of this process (psutil, sampled by a thread), with
glibc's mmap threshold pinned low (the script re-executes itself) so freed tensors leave RSS.
Run: `python benchmarks/loss.py [--max-n 8192]`.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_simclr.loss import nt_xent  # noqa: E402

MiB = 2**20


def _mask_and_ce(sim: torch.Tensor, n: int, temperature: float) -> torch.Tensor:
    """Cross-entropy over [positive, negatives] picked from a full (2N, 2N) similarity with a mask."""
    z_device = sim.device
    positives = torch.cat([torch.diag(sim, n), torch.diag(sim, -n)]).view(2 * n, 1)  # (2N, 1)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z_device)
    keep = ~(eye | eye.roll(n, dims=1))  # (2N, 2N): not self, not positive
    negatives = sim[keep].view(2 * n, -1)  # (2N, 2N - 2)
    logits = torch.cat([positives, negatives], dim=1) / temperature  # (2N, 2N - 1)
    labels = torch.zeros(2 * n, dtype=torch.long, device=z_device)
    return F.cross_entropy(logits, labels, reduction="sum") / (2 * n)


def full_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain full-matrix NT-Xent: normalise, one (2N, 2N) matmul, mask out self and positives."""
    z = F.normalize(torch.cat([z2, z1]).float(), dim=1)  # (2N, D)
    return _mask_and_ce(z @ z.T, z1.shape[0], temperature)  # (2N, 2N) -> ()


def seed_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The seed's formulation: cosine_similarity by broadcasting through a (2N, 2N, D) tensor."""
    z = torch.cat([z2, z1]).float()  # (2N, D)
    sim = F.cosine_similarity(z.unsqueeze(1), z.unsqueeze(0), dim=-1)  # (2N, 2N) via (2N, 2N, D)
    return _mask_and_ce(sim, z1.shape[0], temperature)


class RssPeak:
    """Peak resident-set growth over a block, sampled every millisecond."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0

    def __enter__(self) -> RssPeak:
        self._base = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss - self._base)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss - self._base)


def measure(fn: Callable, n: int, d: int, device: torch.device, repeats: int) -> tuple[float, int, float]:
    """Median seconds per forward+backward, peak bytes, and the loss value."""
    g = torch.Generator(device="cpu").manual_seed(0)
    z1 = torch.randn(n, d, generator=g).to(device).requires_grad_()
    z2 = torch.randn(n, d, generator=g).to(device).requires_grad_()
    times, peak, value = [], 0, float("nan")
    warmup = 1 if repeats > 1 else 0  # large N: one untimed run would double the cost
    for _ in range(repeats + warmup):
        z1.grad = z2.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            loss = fn(z1, z2, 0.5)
            loss.backward()
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            with RssPeak() as rss:
                start = time.perf_counter()
                loss = fn(z1, z2, 0.5)
                loss.backward()
                elapsed = time.perf_counter() - start
            peak = max(peak, rss.peak)
        value = loss.item()
        del loss
        times.append(elapsed)
    times = sorted(times[warmup:])
    return times[len(times) // 2], peak, value


def _pinned_malloc() -> None:
    """Re-exec with glibc's mmap threshold fixed at 1 MiB, so RSS follows live CPU tensors."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MiB))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _cell(result: tuple[float, int, float] | None, ours: tuple[float, int, float]) -> str:
    if result is None:
        return f"{'-':>8} {'-':>7} {'-':>6} {'-':>6} {'-':>7}"
    t, m, v = result
    return (f"{t * 1e3:8.1f} {m / MiB:7.0f} {t / ours[0]:6.2f} {m / max(ours[1], 1):6.2f} "
            f"{abs(v - ours[2]):7.0e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-n", type=int, default=256, help="smallest number of pairs N")
    parser.add_argument("--max-n", type=int, default=8192, help="largest number of pairs N")
    parser.add_argument("--seed-max-elems", type=float, default=2**26,
                        help="run the seed reference only while its (2N, 2N, D) tensor has at most this many elements")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 2048], help="embedding sizes D")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per point (median), 1 above N=2048")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        _pinned_malloc()
    mem_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "RSS growth (psutil)"
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, memory = {mem_kind}")
    print("ratios: reference / ours (> 1: ours faster or smaller); |dl|: loss difference to ours")
    refs = f"{'ms':>8} {'MiB':>7} {'t x':>6} {'m x':>6} {'|dl|':>7}"
    print(f"{'':>12} | {'ours':^16} | {'full 2N x 2N + mask':^38} | {'seed (2N, 2N, D)':^38}")
    header = f"{'N':>6} {'D':>5} | {'ms':>8} {'MiB':>7} | {refs} | {refs}"
    print(header)
    print("-" * len(header))
    ns = []
    n = args.min_n
    while n <= args.max_n:
        ns.append(n)
        n *= 2
    for d in args.dims:
        for n in ns:
            repeats = args.repeats if n <= 2048 else 1
            ours = measure(nt_xent, n, d, device, repeats)
            full = measure(full_reference, n, d, device, repeats)
            seed = measure(seed_reference, n, d, device, 1) if (2 * n) ** 2 * d <= args.seed_max_elems else None
            print(f"{n:>6} {d:>5} | {ours[0] * 1e3:8.1f} {ours[1] / MiB:7.0f} | {_cell(full, ours)} | "
                  f"{_cell(seed, ours)}", flush=True)


if __name__ == "__main__":
    main()
