"""Per-rank pair loader: patches read by CPU threads, two views made batched on the device.

Every draw (sample order, patch position, view parameters) is a function of (seed, epoch, slot,
view) only, so batches are identical for any worker count, rank split, or resume point.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ds_simclr.data.augment import make_views
from ds_simclr.data.options import DataSpec, ViewsSpec
from ds_simclr.data.params import draw_patch_start, draw_view
from ds_simclr.data.sampling import EpochStream, Layout
from ds_simclr.data.store import PatchStore
from ds_simclr.errors import SpecError


@dataclass
class PairBatch:
    """This rank's part of one micro-batch: two views (n,1,S,S,S) float32 on the device."""

    step: int
    micro: int
    epoch: int
    view1: torch.Tensor
    view2: torch.Tensor
    data_wait_s: float
    """Seconds the training loop waited for this batch (0 when prefetching kept up)."""
    slots: list[int]
    """Stream slots of the samples, within the epoch (for tests and debugging)."""


_DONE = object()


class PairLoader:
    """Yields every (step, micro) from a start step on; see the module docstring for the draws."""

    def __init__(
        self,
        store_dir: Path,
        data: DataSpec,
        views: ViewsSpec,
        *,
        seed: int,
        global_batch: int,
        micro_batch: int,
        grad_accum: int,
        steps_per_epoch: int,
        rank: int,
        world_size: int,
        device: torch.device,
    ) -> None:
        try:
            views.check_patch(data.patch_size)
            self.layout = Layout(global_batch, micro_batch, grad_accum, world_size, steps_per_epoch)
        except ValueError as exc:
            raise SpecError(str(exc), where="views.crop_min / train") from exc
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.device = torch.device(device)
        if views.device == "cuda" and self.device.type != "cuda":
            raise SpecError("views on cuda need a CUDA training device", where="views.device", hint="use auto or cpu")
        self.view_device = torch.device("cpu") if views.device == "cpu" else self.device
        self.store = PatchStore(Path(store_dir), data.modalities, max_open=data.max_open_files)
        self.data, self.recipe, self.seed, self.rank = data, views.recipe(), seed, rank
        self.stream = EpochStream(len(self.store), steps_per_epoch * global_batch, global_batch, seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._again_stream = copy.deepcopy(self.stream)  # `make`'s own: the producer thread owns self.stream

    def _read(self, epoch: int, slot: int, index: int) -> np.ndarray:
        size = self.data.patch_size
        start = draw_patch_start(self.store.shape(index), size, (self.seed, epoch, slot))
        return self.store.read_patch(index, start, size)

    def _submit(self, step: int, micro: int) -> tuple[int, int, int, list[int], list[Future[np.ndarray] | np.ndarray]]:
        epoch = step // self.layout.steps_per_epoch
        slots = self.layout.slots(step, micro, self.rank)
        jobs: list[Future[np.ndarray] | np.ndarray] = []
        for slot in slots:
            index = self.stream.index(epoch, slot)
            jobs.append(self._pool.submit(self._read, epoch, slot, index) if self._pool else self._read(epoch, slot, index))
        return step, micro, epoch, slots, jobs

    def _assemble(self, step: int, micro: int, epoch: int, slots: list[int], jobs: list) -> PairBatch:
        try:
            return self._make_pair(step, micro, epoch, slots, jobs)
        except Exception as exc:  # name what was being made (MONAI's apply_transform habit)
            ids = [self.store.id(self.stream.index(epoch, s)) for s in slots]
            raise RuntimeError(
                f"making views for step {step} micro {micro} (epoch {epoch}, slots {slots}, volumes {ids},"
                f" patch {self.data.patch_size}^3 -> {self.recipe.output_size}^3 on {self.view_device}) failed:"
                f" {type(exc).__name__}: {exc}"
            ) from exc

    def _make_pair(self, step: int, micro: int, epoch: int, slots: list[int], jobs: list) -> PairBatch:
        arrays = [j.result() if isinstance(j, Future) else j for j in jobs]
        patches = torch.from_numpy(np.stack(arrays)[:, None])  # float16: half the bytes to the device
        if self.view_device.type == "cuda":
            patches = patches.pin_memory().to(self.view_device, non_blocking=True)
        size = self.data.patch_size
        pairs = [make_views(patches, [draw_view(self.recipe, size, (self.seed, epoch, s, v)) for s in slots], self.recipe) for v in (1, 2)]
        view1, view2 = (p.to(self.device, non_blocking=True) for p in pairs)
        return PairBatch(step, micro, epoch, view1, view2, 0.0, slots)

    def make(self, step: int, micro: int) -> PairBatch:
        """This rank's part of micro-batch `micro` of optimizer step `step`, made now in the calling thread.

        Bit-identical to what `iterate` yields for it (every draw is a function of seed, epoch, slot and
        view), so a second forward over a micro-batch needs no kept copy of its views (the gradient cache).
        """
        epoch = step // self.layout.steps_per_epoch
        slots = self.layout.slots(step, micro, self.rank)
        arrays = [self._read(epoch, slot, self._again_stream.index(epoch, slot)) for slot in slots]
        return self._assemble(step, micro, epoch, slots, arrays)

    def _produce(self, start_step: int, out: queue.Queue) -> None:
        try:
            ahead: deque = deque()
            order = ((s, m) for s in range(start_step, 2**62) for m in range(self.layout.grad_accum))
            while not self._stop.is_set():
                while len(ahead) < self.data.prefetch + 1:
                    ahead.append(self._submit(*next(order)))
                batch = self._assemble(*ahead.popleft())
                while not self._stop.is_set():
                    try:
                        out.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer, which re-raises it
            if not self._stop.is_set():
                out.put(exc)

    def iterate(self, start_step: int) -> Iterator[PairBatch]:
        """Batches of every (step, micro) from `start_step` on, until `close()`."""
        self.close()
        self._stop.clear()
        if self.data.num_workers > 0:
            self._pool = ThreadPoolExecutor(self.data.num_workers, thread_name_prefix="patch-reader")
        out: queue.Queue = queue.Queue(maxsize=self.data.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(start_step, out), daemon=True, name="pair-producer")
        self._thread.start()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            item = out.get()
            if isinstance(item, BaseException):
                raise item
            item.data_wait_s = time.perf_counter() - t0
            yield item

    def close(self) -> None:
        """Stop the producer and the reader threads (safe to call twice)."""
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.store.close()
