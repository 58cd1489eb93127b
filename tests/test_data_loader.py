"""PairLoader: batches depend on (seed, epoch, slot, view) only: not on rank split, workers or resume."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from data_helpers import real_store

from ds_simclr.data.loader import PairBatch, PairLoader
from ds_simclr.data.options import DataSpec, ViewsSpec
from ds_simclr.data.sampling import EpochStream, Layout
from ds_simclr.errors import SpecError

VIEWS = ViewsSpec(output_size=24, crop_min=12, noise_prob=0.5)
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_store(tmp_path_factory.mktemp("loader"))


def _batches(store: Path, n: int, *, micro: int, world: int, rank: int, accum: int = 1, workers: int = 2, start: int = 0) -> list[PairBatch]:
    data = DataSpec(store=store, patch_size=32, num_workers=workers, prefetch=2)
    loader = PairLoader(
        store,
        data,
        VIEWS,
        seed=11,
        global_batch=micro * world * accum,
        micro_batch=micro,
        grad_accum=accum,
        steps_per_epoch=STEPS_PER_EPOCH,
        rank=rank,
        world_size=world,
        device=torch.device("cpu"),
    )
    try:
        return list(itertools.islice(loader.iterate(start), n))
    finally:
        loader.close()


def _same(a: list[PairBatch], b: list[PairBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.step, x.micro, x.epoch, x.slots) == (y.step, y.micro, y.epoch, y.slots)
        torch.testing.assert_close(x.view1, y.view1, atol=0, rtol=0)
        torch.testing.assert_close(x.view2, y.view2, atol=0, rtol=0)


def test_one_rank_equals_two_ranks_concatenated(store: Path) -> None:
    whole = _batches(store, 4, micro=4, world=1, rank=0)
    parts = [_batches(store, 4, micro=2, world=2, rank=r) for r in range(2)]
    for w, r0, r1 in zip(whole, *parts):
        assert w.slots == r0.slots + r1.slots
        torch.testing.assert_close(w.view1, torch.cat([r0.view1, r1.view1]), atol=0, rtol=0)
        torch.testing.assert_close(w.view2, torch.cat([r0.view2, r1.view2]), atol=0, rtol=0)


def test_worker_count_does_not_matter(store: Path) -> None:
    _same(_batches(store, 3, micro=2, world=1, rank=0, workers=0), _batches(store, 3, micro=2, world=1, rank=0, workers=3))


def test_resume_gives_the_uninterrupted_batches(store: Path) -> None:
    full = _batches(store, 10, micro=1, world=1, rank=0, accum=2)
    assert [(b.step, b.micro) for b in full[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _same(full[8:], _batches(store, 2, micro=1, world=1, rank=0, accum=2, start=4))


def test_batches_have_views_of_the_right_shape_and_epochs(store: Path) -> None:
    batches = _batches(store, 4, micro=2, world=1, rank=0)
    assert [b.epoch for b in batches] == [0, 0, 0, 1]
    assert batches[3].slots == [0, 1]
    b = batches[0]
    assert b.view1.shape == (2, 1, 24, 24, 24) and b.view1.dtype == torch.float32
    assert not torch.equal(b.view1, b.view2)
    assert torch.isfinite(b.view1).all() and b.data_wait_s >= 0


def test_epoch_stream_is_a_sequence_of_permutations() -> None:
    stream = EpochStream(5, 12, 4, seed=3)
    epoch0 = [stream.index(0, s) for s in range(12)]
    assert sorted(epoch0[:5]) == list(range(5)) and sorted(epoch0[5:10]) == list(range(5))
    assert [stream.index(1, s) for s in range(12)] != epoch0
    assert [EpochStream(5, 12, 4, seed=3).index(0, s) for s in range(12)] == epoch0


def test_layout_arithmetic() -> None:
    layout = Layout(global_batch=12, micro_batch=2, grad_accum=2, world_size=3, steps_per_epoch=4)
    assert layout.slots(5, 1, 2) == [12 + 6 + 4, 12 + 6 + 5]
    with pytest.raises(ValueError):
        Layout(global_batch=10, micro_batch=2, grad_accum=2, world_size=3, steps_per_epoch=4)


def test_bad_settings_are_spec_errors(store: Path) -> None:
    data = DataSpec(store=store, patch_size=32)
    kw = dict(seed=0, global_batch=2, micro_batch=2, grad_accum=1, steps_per_epoch=1, rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(SpecError, match="crop_min"):
        PairLoader(store, data, ViewsSpec(crop_min=60), **kw)
    with pytest.raises(SpecError, match="cuda"):
        PairLoader(store, data, ViewsSpec(output_size=24, crop_min=12, device="cuda"), **kw)


def test_reader_errors_reach_the_training_loop(store: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    for npy in (broken / "images").rglob("*.npy"):
        npy.write_bytes(b"not an array")
    with pytest.raises(RuntimeError, match="failed: ValueError"):
        _batches(broken, 1, micro=2, world=1, rank=0)


def test_close_mid_stream_and_restart(store: Path) -> None:
    data = DataSpec(store=store, patch_size=32, num_workers=2, prefetch=3)
    loader = PairLoader(
        store, data, VIEWS, seed=11, global_batch=2, micro_batch=2, grad_accum=1,
        steps_per_epoch=STEPS_PER_EPOCH, rank=0, world_size=1, device=torch.device("cpu"),
    )
    first = next(iter(loader.iterate(0)))
    loader.close()
    again = next(iter(loader.iterate(0)))
    loader.close()
    torch.testing.assert_close(first.view1, again.view1, atol=0, rtol=0)


def test_a_failing_read_names_step_slots_and_volumes(tmp_path: Path) -> None:
    """A volume that vanished from the store: the error says which step, slots and volumes."""
    store = real_store(tmp_path / "store")
    data = DataSpec(store=store, patch_size=24, num_workers=1)
    loader = PairLoader(
        store, data, ViewsSpec(output_size=16, crop_min=12), seed=0, global_batch=2, micro_batch=2, grad_accum=1,
        steps_per_epoch=2, rank=0, world_size=1, device=torch.device("cpu"),
    )
    for volume in (store / "images").rglob("*.npy"):
        volume.unlink()
    with pytest.raises(RuntimeError, match=r"making views for step 0 micro 0 \(epoch 0, slots \[0, 1\], volumes \["):
        next(loader.iterate(0))
    loader.close()
