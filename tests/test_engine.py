"""The DeepSpeed engine on the CPU accelerator with real ranks (gloo), the real loader and model.

World-size equivalence: 2 ranks x n pairs (different data on each rank) against 1 rank x 2n pairs
give the same loss, averaged gradients and parameters. Non-finite steps are skipped on every rank.
Resume is bit-exact. A resumed run refuses a changed spec.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_spec_mapping
from multiproc import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _param_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- equivalence


def _equivalence_worker(mapping: dict, zero_stage: int, optimizer: str, steps: int, lr: float = 0.05) -> dict[str, Any]:
    """Steps of our model + loss + loader under DeepSpeed with a client optimizer (SGD or AdamW)."""
    import deepspeed

    from ds_simclr.data.loader import PairLoader
    from ds_simclr.data.source import resolve_store
    from ds_simclr.dsconfig import deepspeed_config, plan_batch
    from ds_simclr.loss import nt_xent
    from ds_simclr.model import build_model
    from ds_simclr.runtime import init_distributed
    from ds_simclr.specload import spec_from_mapping

    spec = spec_from_mapping(mapping)
    place = init_distributed("gloo", 2)
    batch = plan_batch(spec, place.world_size)
    config = deepspeed_config(spec, place.world_size)
    del config["optimizer"], config["scheduler"]
    config["zero_optimization"]["stage"] = zero_stage
    config["zero_allow_untested_optimizer"] = True  # SGD is not on ZeRO's tested list
    torch.manual_seed(spec.seed)
    model = build_model("resenc_tiny", head_hidden=32, head_out=16, head_layers=2)
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt_cls(model.parameters(), lr=lr), config=config)
    loader = PairLoader(
        resolve_store(spec.data), spec.data, spec.views, seed=spec.seed, global_batch=spec.train.global_batch,
        micro_batch=batch.micro_batch, grad_accum=batch.grad_accum, steps_per_epoch=spec.train.steps_per_epoch,
        rank=place.rank, world_size=place.world_size, device=place.device,
    )
    losses, first_grads = [], None
    batches = loader.iterate(0)
    for _ in range(steps):
        pair = next(batches)
        z1, z2 = engine(torch.cat([pair.view1, pair.view2])).chunk(2)
        loss = nt_xent(z1, z2, spec.loss.temperature)
        engine.backward(loss)
        if first_grads is None and zero_stage == 0:
            first_grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()}
        engine.step()
        losses.append(float(loss.detach()))
    loader.close()
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {"losses": losses, "grads": first_grads, "params": params}


def _max_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest element difference relative to the largest element, over all tensors.

    (Per tensor would divide by ~0 for conv biases in front of InstanceNorm, whose true gradient
    is 0 and whose computed one is rounding noise.)
    """
    diff = max((a[name] - b[name]).abs().max().item() for name in b)
    scale = max(t.abs().max().item() for t in b.values())
    return diff / scale


@pytest.fixture(scope="module")
def equivalence_mapping(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return tiny_spec_mapping(demo_cache, tmp_path_factory.mktemp("eq"), global_batch=4)


def test_loss_and_gradients_equal_one_process(equivalence_mapping: dict) -> None:
    one = run_ranks(_equivalence_worker, 1, equivalence_mapping, 0, "sgd", 1)[0]
    two = run_ranks(_equivalence_worker, 2, equivalence_mapping, 0, "sgd", 1)
    assert two[0]["losses"] == two[1]["losses"]  # every rank reports the global loss
    assert two[0]["losses"][0] == pytest.approx(one["losses"][0], abs=1e-6)
    assert _max_relative(two[0]["grads"], one["grads"]) < 1e-5


# lr 1e-3: a larger step lets float rounding (1e-7) flip a ReLU unit of the tiny head, which makes
# one update differ by lr x that unit's gradient (4e-5 relative at lr 1e-2): not a ZeRO effect.
# AdamW divides by sqrt(v): parameters whose true gradient is 0 (conv biases in front of
# InstanceNorm) get rounding noise as gradient and move +-lr either way, so its bound is loose;
# SGD is the check that catches a wrong gradient scale.
@pytest.mark.parametrize(("optimizer", "tolerance"), [("sgd", 1e-5), ("adamw", 1e-2)])
def test_zero1_parameters_after_5_steps_equal_one_process(equivalence_mapping: dict, optimizer: str, tolerance: float) -> None:
    one = run_ranks(_equivalence_worker, 1, equivalence_mapping, 1, optimizer, 5, 1e-3)[0]
    two = run_ranks(_equivalence_worker, 2, equivalence_mapping, 1, optimizer, 5, 1e-3)
    assert _max_relative(two[0]["params"], two[1]["params"]) == 0.0
    error = _max_relative(two[0]["params"], one["params"])
    print(f"ZeRO-1 {optimizer}: max relative parameter difference 2 ranks vs 1 after 5 steps = {error:.2e}")
    assert error < tolerance
    assert two[0]["losses"] == pytest.approx(one["losses"], abs=tolerance)


# --------------------------------------------------------------------------- the trainer


def _trainer_worker(mapping: dict, stop_at: int | None, nan_steps: tuple[int, ...] = ()) -> dict[str, Any]:
    """Run the real Trainer; NaN is injected into rank 1's first view at the given steps."""
    from ds_simclr.engine import Trainer
    from ds_simclr.errors import TrainingError
    from ds_simclr.specload import spec_from_mapping

    trainer = Trainer(spec_from_mapping(mapping))
    real_iterate = trainer.loader.iterate

    def poisoned(start: int):
        for pair in real_iterate(start):
            if pair.step in nan_steps and torch.distributed.get_rank() == 1:
                pair.view1[0].fill_(float("nan"))
            yield pair

    trainer.loader.iterate = poisoned
    hashes: dict[int, str] = {}
    real_step = trainer._optimizer_step

    def step_and_hash(batches):
        row = real_step(batches)
        hashes[trainer.state.step + 1] = _param_hash(trainer.engine.module)
        return row

    trainer._optimizer_step = step_and_hash
    try:
        result = trainer.run(stop_at=stop_at)
        error = None
    except TrainingError as exc:
        result, error = None, str(exc)
    return {
        "hash": _param_hash(trainer.engine.module),
        "step_hashes": hashes,
        "steps_done": trainer.state.step,
        "skipped": trainer.state.skipped_steps,
        "error": error,
        "stopped_early": result.stopped_early if result else None,
    }


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bit_exact_on_two_ranks(demo_cache: Path, tmp_path: Path) -> None:
    steps = 6
    full = tiny_spec_mapping(demo_cache, tmp_path / "full", precision="bf16", max_steps=steps)
    parts = tiny_spec_mapping(demo_cache, tmp_path / "parts", precision="bf16", max_steps=steps)
    whole = run_ranks(_trainer_worker, 2, full, None)
    first = run_ranks(_trainer_worker, 2, parts, 3)
    assert first[0]["steps_done"] == 3
    assert (tmp_path / "parts/t/checkpoints/step_3").is_dir()
    resumed = run_ranks(_trainer_worker, 2, parts, None)
    assert resumed[0]["steps_done"] == steps
    assert resumed[0]["hash"] == resumed[1]["hash"] == whole[0]["hash"]

    whole_rows, part_rows = _metrics(tmp_path / "full/t"), _metrics(tmp_path / "parts/t")
    assert [r["step"] for r in part_rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in part_rows] == [r["loss"] for r in whole_rows]  # bit-exact, bf16
    assert [r["lr"] for r in part_rows] == [r["lr"] for r in whole_rows]
    assert all(math.isfinite(r["loss"]) for r in whole_rows)
    for row in whole_rows:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "positive_top1", "alignment", "uniformity"} <= row.keys()
    latest = (tmp_path / "parts/t/checkpoints/latest").read_text()
    assert latest == f"step_{steps}"


def test_nonfinite_step_is_skipped_on_every_rank(demo_cache: Path, tmp_path: Path) -> None:
    from ds_simclr.schedule import planned_lrs
    from ds_simclr.specload import spec_from_mapping

    mapping = tiny_spec_mapping(demo_cache, tmp_path, precision="bf16", max_steps=4)
    results = run_ranks(_trainer_worker, 2, mapping, None, (1,))  # step index 1 = optimizer step 2
    for result in results:
        assert result["skipped"] == 1 and result["steps_done"] == 4 and result["error"] is None
        assert result["step_hashes"][2] == result["step_hashes"][1]  # no update at the skipped step
        assert result["step_hashes"][3] != result["step_hashes"][2]
    rows = _metrics(tmp_path / "t")
    assert [r["skipped"] for r in rows] == [False, True, False, False]
    assert math.isnan(rows[1]["loss"]) and rows[-1]["skipped_steps"] == 1
    assert [r["lr"] for r in rows] == pytest.approx(planned_lrs(spec_from_mapping(mapping)))


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(demo_cache: Path, tmp_path: Path) -> None:
    mapping = tiny_spec_mapping(demo_cache, tmp_path, max_steps=6, max_nonfinite_steps=2)
    results = run_ranks(_trainer_worker, 2, mapping, None, (1, 2))
    assert all("2 steps in a row had a non-finite loss" in r["error"] for r in results)
    assert (tmp_path / "t/checkpoints/latest").read_text() == "step_3"


def test_changed_spec_is_refused_on_resume(demo_cache: Path, tmp_path: Path) -> None:
    mapping = tiny_spec_mapping(demo_cache, tmp_path, max_steps=2)
    run_ranks(_trainer_worker, 1, mapping, None)
    changed = json.loads(json.dumps(mapping))
    changed["loss"] = {"temperature": 0.2}
    with pytest.raises(AssertionError, match="loss.temperature"):
        run_ranks(_trainer_worker, 1, changed, None)
    longer = json.loads(json.dumps(mapping))
    longer["train"]["max_steps"] = 3
    assert run_ranks(_trainer_worker, 1, longer, None)[0]["steps_done"] == 3


def test_nonfinite_micro_batch_with_accumulation_skips_the_whole_step(demo_cache: Path, tmp_path: Path) -> None:
    """grad_accum 2, bf16 ZeRO-1: a NaN in one rank's micro-batches voids the whole optimizer step."""
    from ds_simclr.schedule import planned_lrs
    from ds_simclr.specload import spec_from_mapping

    mapping = tiny_spec_mapping(demo_cache, tmp_path, precision="bf16", max_steps=3, grad_accum=2)
    results = run_ranks(_trainer_worker, 2, mapping, None, (1,))
    for result in results:
        assert result["skipped"] == 1 and result["error"] is None
        assert result["step_hashes"][2] == result["step_hashes"][1]
        assert result["step_hashes"][3] != result["step_hashes"][2]
    rows = _metrics(tmp_path / "t")
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert [r["lr"] for r in rows] == pytest.approx(planned_lrs(spec_from_mapping(mapping)))


def test_a_store_that_is_not_ready_ends_the_ranks_before_any_collective(demo_cache: Path, tmp_path: Path) -> None:
    """Ranks never preprocess: a manifest whose store `launch` did not prepare ends them at once, naming the command."""
    import time

    manifest = tmp_path / "pretrain_data.json"
    manifest.write_text("{not json")
    mapping = tiny_spec_mapping(demo_cache, tmp_path, max_steps=2)
    mapping["data"] = {"manifest": str(manifest), "store": str(tmp_path / "store"), "patch_size": 40}
    started = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_ranks(_trainer_worker, 2, mapping, None)
    assert "no store.json" in str(info.value) and f"ds_simclr data preprocess {manifest}" in str(info.value)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "store").exists()
