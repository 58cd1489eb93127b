"""Gradient cache (`train.gradient_cache`): a step's loss and gradient equal one micro-batch of the whole batch.

Exactness runs the real Trainer (real DeepSpeed engine on the CPU accelerator, real loader on the real
demo MRI, ZeRO-1, gloo ranks): 1 rank x accumulation 4 x micro 2 and 2 ranks x accumulation 2 x
micro 2, both with the cache, against 1 rank x micro 8, clipping off; plain accumulation (cache off)
must differ. Then what the batch arithmetic refuses and what `validate`/`plan` say.

Why AdamW runs with eps 1 here: with its default eps, Adam's first steps are sign steps (m / sqrt(v) =
+-1 per element), which turn float rounding in gradients that are ~0 (conv biases in front of
InstanceNorm) into +-lr moves; measured here, after 3 steps that made parameters differ 2e-2 relative
between a micro-8 run and any other split of the same batch, gradient cache or not. With eps 1 (above
every gradient element) the update is lr x the bias-corrected momentum of the gradient: smooth, so
rounding stays rounding, and a gradient off by a constant factor moves the parameters by that factor
(AdamW would hide it). The learning rate is small (1e-3) because the tiny encoder's deepest stage has 3^3
voxels: a parameter change of ~1e-6 relative flips LeakyReLU units there and changes the gradient by
~1e-3 (measured), so larger steps let rounding decide which units flip.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import CONFIGS, tiny_spec_mapping
from multiproc import run_ranks

from ds_simclr.cli import main
from ds_simclr.dsconfig import check_batch, plan_batch, working_world_sizes
from ds_simclr.errors import BatchArithmeticError
from ds_simclr.planning import plan_report
from ds_simclr.specload import load_spec, spec_from_mapping

GRADCACHE_SPEC = CONFIGS / "ssl3d_resencl_1x4_gradcache.yaml"
QUICKSTART = CONFIGS / "quickstart.yaml"
STEPS = 3
SPEED = {"activation_checkpointing": True, "channels_last": True}


def _max_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest element difference relative to the largest element of `b`, over all tensors."""
    diff = max((a[name] - b[name]).abs().max().item() for name in b)
    return diff / max(t.abs().max().item() for t in b.values())


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------- exactness through the Trainer


def _mapping(cache: Path, out: Path, precision: str, **train: Any) -> dict:
    """8 pairs per step, 24^3 views, clipping off, AdamW with eps 1 (see the module docstring)."""
    mapping = tiny_spec_mapping(
        cache, out, global_batch=8, max_steps=STEPS + 1, grad_clip=0.0, precision=precision, **train
    )
    mapping["views"]["output_size"] = 24
    mapping["optimizer"] = {"lr": 1e-3, "eps": 1.0}
    mapping["schedule"] = {"warmup_steps": 0}
    return mapping


def _params(trainer: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in trainer.engine.module.named_parameters()}


def _trainer_steps(mappings: list[dict], steps: int) -> list[dict[str, Any]]:
    """Several Trainers one after another in this rank's process: `steps` optimizer steps each."""
    from ds_simclr.engine import Trainer

    out = []
    for mapping in mappings:
        trainer = Trainer(spec_from_mapping(mapping))
        batches = trainer.loader.iterate(0)
        rows = []
        for _ in range(steps):
            rows.append(trainer._optimizer_step(batches))
            trainer.state.step += 1
        trainer.loader.close()
        out.append({"rows": rows, "params": _params(trainer)})
    return out


def _trainer_run(mapping: dict, nan_step: int) -> dict[str, Any]:
    """`Trainer.run` to the end; NaN in rank 1's first view at optimizer step `nan_step` (1-based)."""
    from ds_simclr.engine import Trainer

    trainer = Trainer(spec_from_mapping(mapping))
    real_iterate = trainer.loader.iterate

    def poisoned(start: int):
        for pair in real_iterate(start):
            if pair.step + 1 == nan_step and torch.distributed.get_rank() == 1:
                pair.view1[0].fill_(float("nan"))
            yield pair

    trainer.loader.iterate = poisoned
    params: dict[int, dict[str, torch.Tensor]] = {}
    real_step = trainer._optimizer_step

    def step_and_keep(batches):
        row = real_step(batches)
        params[trainer.state.step + 1] = _params(trainer)
        return row

    trainer._optimizer_step = step_and_keep
    result = trainer.run()
    return {"params": params, "skipped": result.skipped_steps}


@pytest.fixture(scope="module")
def one_rank(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """fp32 and bf16: micro 8 (reference), accumulation 4 x micro 2 with and without the cache."""
    out = tmp_path_factory.mktemp("gc1")
    configs = {
        "fp32 micro 8": _mapping(demo_cache, out / "a", "fp32", micro_batch=8),
        "fp32 cache": _mapping(demo_cache, out / "b", "fp32", micro_batch=2, grad_accum=4, gradient_cache=True),
        "fp32 plain accumulation": _mapping(demo_cache, out / "c", "fp32", micro_batch=2, grad_accum=4),
        "fp32 micro 8, speed options": _mapping(demo_cache, out / "f", "fp32", micro_batch=8, **SPEED),
        "fp32 cache, speed options": _mapping(
            demo_cache, out / "g", "fp32", micro_batch=2, grad_accum=4, gradient_cache=True, **SPEED
        ),
        "bf16 micro 8": _mapping(demo_cache, out / "d", "bf16", micro_batch=8),
        "bf16 cache": _mapping(demo_cache, out / "e", "bf16", micro_batch=2, grad_accum=4, gradient_cache=True),
    }
    trainers, dropout = run_ranks(_one_rank_jobs, 1, list(configs.values()), STEPS)[0]
    return {**dict(zip(configs, trainers)), "dropout": dropout}


def _one_rank_jobs(mappings: list[dict], steps: int) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Everything on one rank in one process (DeepSpeed's import and start-up once)."""
    return _trainer_steps(mappings, steps), {"replayed": _dropout_step(True), "not replayed": _dropout_step(False)}


def _compare(result: dict, reference: dict) -> tuple[list[float], list[float], float]:
    """Per step: relative loss and gradient-norm differences; then the parameters' max relative difference."""
    losses = [_relative(r["loss"], q["loss"]) for r, q in zip(result["rows"], reference["rows"], strict=True)]
    norms = [_relative(r["grad_norm"], q["grad_norm"]) for r, q in zip(result["rows"], reference["rows"], strict=True)]
    return losses, norms, _max_relative(result["params"], reference["params"])


@pytest.mark.distributed
@pytest.mark.slow
def test_cache_over_4_micro_batches_equals_one_micro_batch_of_8(one_rank: dict) -> None:
    reference = one_rank["fp32 micro 8"]
    losses, norms, params = _compare(one_rank["fp32 cache"], reference)
    print(f"fp32 1 x 4 x 2 cache vs 1 x 8: loss {max(losses):.1e}, grad norm {max(norms):.1e}, params {params:.1e}")
    assert max(losses) < 1e-5 and max(norms) < 1e-5 and params < 1e-5
    assert all(not r["skipped"] for r in one_rank["fp32 cache"]["rows"])
    # Metrics cover every pair of the step: 8 pairs, the same numbers as the reference's one micro-batch.
    for cached, plain in zip(one_rank["fp32 cache"]["rows"], reference["rows"]):
        assert cached["positive_top1"] == pytest.approx(plain["positive_top1"], abs=1e-12)
        assert cached["uniformity"] == pytest.approx(plain["uniformity"], rel=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_cache_with_activation_checkpointing_and_channels_last(one_rank: dict) -> None:
    """With the speed options on both sides (the cache's graph-free first forward does not checkpoint,
    its second does and recomputes in backward). Against the plain run with the same options: channels_last
    alone moved the first gradient norm by 3.5e-4 relative on this data (its kernels round differently, and
    by batch size: micro 2 against 8). The gradient norms differ by 7.9e-7 to 1.8e-5 relative depending on
    the batch (the last: step 3, where a pass over the data starts, its head reordered), hence 5e-5 for them."""
    reference = one_rank["fp32 micro 8, speed options"]
    losses, norms, params = _compare(one_rank["fp32 cache, speed options"], reference)
    print(f"fp32 cache vs 1 x 8, both checkpointing + channels_last: loss {max(losses):.1e}, grad norm {max(norms):.1e},"
          f" params {params:.1e}")
    assert max(losses) < 1e-5 and max(norms) < 5e-5 and params < 1e-5


@pytest.mark.distributed
@pytest.mark.slow
def test_plain_accumulation_differs(one_rank: dict) -> None:
    """The same comparison fails without the cache: micro-batches of 2 pairs see 2 negatives, not 14."""
    losses, norms, params = _compare(one_rank["fp32 plain accumulation"], one_rank["fp32 micro 8"])
    print(f"fp32 1 x 4 x 2 plain vs 1 x 8: loss {min(losses):.1e}, grad norm {min(norms):.1e}, params {params:.1e}")
    assert min(losses) > 0.1 and min(norms) > 1e-3 and params > 1e-5


@pytest.mark.distributed
@pytest.mark.slow
def test_bf16_cache_equals_one_micro_batch_within_bf16_rounding(one_rank: dict) -> None:
    """bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3). The split changes the convolutions'
    blocking, so embeddings differ in their last bit; the fp32 loss averages that (measured <= 8e-5) and
    so does the gradient norm at step 1, same weights (<= 5e-5). From step 2 on, the fp32 master weights
    differ by rounding, and where one crosses a bf16 rounding boundary its bf16 copy moves a whole unit
    (3.9e-3 relative); through the tiny encoder's 3^3-voxel deepest stage that moved the gradient norm by
    up to 1e-2 (measured). Tolerances: 1e-3 for losses and the first gradient norm (a quarter unit),
    3e-2 for later norms; plain accumulation is 0.6 off in loss and 4e-2 in the first norm."""
    reference = one_rank["bf16 micro 8"]
    losses, norms, _ = _compare(one_rank["bf16 cache"], reference)
    print(f"bf16 1 x 4 x 2 cache vs 1 x 8: loss {max(losses):.1e}, grad norms {', '.join(f'{n:.1e}' for n in norms)}")
    assert max(losses) < 1e-3 and norms[0] < 1e-3 and max(norms) < 3e-2
    bf16_unit = 2.0**-8
    assert _max_relative(one_rank["bf16 cache"]["params"], reference["params"]) <= bf16_unit


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_with_cache_equal_one_micro_batch_and_skip_a_nonfinite_step(
    one_rank: dict, demo_cache: Path, tmp_path: Path
) -> None:
    """2 ranks x accumulation 2 x micro 2 through `Trainer.run`; step 4 has a NaN view on rank 1 only."""
    from ds_simclr.schedule import planned_lrs

    mapping = _mapping(demo_cache, tmp_path, "fp32", micro_batch=2, grad_accum=2, gradient_cache=True)
    ranks = run_ranks(_trainer_run, 2, mapping, STEPS + 1)
    rows = [json.loads(line) for line in (tmp_path / "t/metrics.jsonl").read_text().splitlines()]
    result = {"rows": rows[:STEPS], "params": ranks[0]["params"][STEPS]}
    losses, norms, params = _compare(result, one_rank["fp32 micro 8"])
    print(f"fp32 2 x 2 x 2 cache vs 1 x 8: loss {max(losses):.1e}, grad norm {max(norms):.1e}, params {params:.1e}")
    # the gradient norm of step 3 (a batch where a pass over the data starts, its head reordered) came out
    # 4.4e-5 relative apart (the two ranks' reduction adds in another order); steps 1-2: 3e-7
    assert max(losses) < 1e-5 and max(norms) < 1e-4 and params < 1e-5
    assert _max_relative(ranks[1]["params"][STEPS], ranks[0]["params"][STEPS]) == 0.0

    # The NaN reached the step's one loss: skipped on both ranks, nothing reached DeepSpeed, LR on plan.
    assert [r["skipped"] for r in rows] == [False] * STEPS + [True]
    assert math.isnan(rows[-1]["loss"]) and rows[-1]["skipped_steps"] == 1
    assert [r["lr"] for r in rows] == pytest.approx(planned_lrs(spec_from_mapping(mapping)))
    for rank in ranks:
        assert rank["skipped"] == 1
        assert _max_relative(rank["params"][STEPS + 1], rank["params"][STEPS]) == 0.0


# --------------------------------------------------------------------------- random draws are replayed


def _dropout_step(replay: bool) -> dict[str, float]:
    """A model with dropout through a real engine (ZeRO-0, SGD lr 1, no clipping): one cached step
    against one graph over all micro-batches drawn in the same order. replay=False switches the
    replay of the first forward's RNG state off, to show that the comparison can fail."""
    import contextlib

    import deepspeed

    from ds_simclr import gradcache
    from ds_simclr.loss import nt_xent

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 8))
    views = [torch.randn(4, 12) for _ in range(4)]  # 4 micro-batches of 2 pairs
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
              "gradient_clipping": 0.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config)
    before = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(1)
    z = [model(v).chunk(2) for v in views]
    reference = nt_xent(torch.cat([a for a, _ in z]), torch.cat([b for _, b in z]), 0.5)
    expected = torch.autograd.grad(reference, list(model.parameters()))

    real_replay = gradcache._RngState.replay
    if not replay:
        gradcache._RngState.replay = lambda self: contextlib.nullcontext()
    try:
        torch.manual_seed(1)
        step = gradcache.gradient_cache_step(engine, views, views.__getitem__, 0.5)
    finally:
        gradcache._RngState.replay = real_replay
    applied = [b - p.detach() for b, p in zip(before, model.parameters())]  # lr 1: the gradient
    error = max((a - e).abs().max().item() for a, e in zip(applied, expected))
    return {"error": error, "scale": max(e.abs().max().item() for e in expected), "loss": step.loss,
            "reference": reference.item()}


@pytest.mark.distributed
@pytest.mark.slow
def test_random_draws_of_the_first_forward_are_replayed_in_the_second(one_rank: dict) -> None:
    replayed, not_replayed = one_rank["dropout"]["replayed"], one_rank["dropout"]["not replayed"]
    assert replayed["loss"] == pytest.approx(replayed["reference"], rel=1e-6)
    assert replayed["error"] < 1e-6 * replayed["scale"]
    assert not_replayed["error"] > 1e-2 * not_replayed["scale"]  # other dropout masks: a wrong gradient


def test_loader_makes_a_micro_batch_again_bit_identically(demo_cache: Path) -> None:
    """The second forward's views come from `PairLoader.make`: equal to the streamed ones, bit for bit,
    with every random transform on, on rank 1 of 2, across epochs and in any order."""
    from ds_simclr.data.loader import PairLoader
    from ds_simclr.data.options import DataSpec, ViewsSpec
    from ds_simclr.data.source import resolve_store

    data = DataSpec(demo=True, cache_dir=demo_cache, patch_size=32, num_workers=2)
    views = ViewsSpec(output_size=24, crop_min=12, rotate_prob=1.0, rotate_range_deg=(30.0, 20.0, 10.0),
                      noise_prob=0.5, blur_prob=0.5, bias_field_prob=0.5, gamma_prob=0.5)
    loader = PairLoader(resolve_store(data), data, views, seed=5, global_batch=8, micro_batch=2, grad_accum=2,
                        steps_per_epoch=1, rank=1, world_size=2, device=torch.device("cpu"))
    stream = loader.iterate(0)
    streamed = [next(stream) for _ in range(6)]  # steps 0, 1, 2 (one epoch each) x 2 micro-batches
    try:
        for batch in reversed(streamed):
            again = loader.make(batch.step, batch.micro)
            assert again.slots == batch.slots and again.epoch == batch.step
            assert torch.equal(again.view1, batch.view1) and torch.equal(again.view2, batch.view2)
    finally:
        loader.close()


# --------------------------------------------------------------------------- batch arithmetic, validate, plan


def test_negatives_per_anchor_in_both_modes() -> None:
    plain = plan_batch(load_spec(GRADCACHE_SPEC, ["train.gradient_cache=false"]), 4)
    cached = plan_batch(load_spec(GRADCACHE_SPEC), 4)
    assert (plain.micro_batch, plain.grad_accum) == (cached.micro_batch, cached.grad_accum) == (5, 6)
    assert plain.negatives_per_anchor == 2 * 5 * 4 - 2 == 38
    assert cached.negatives_per_anchor == 2 * 120 - 2 == 238


def test_validate_and_plan_state_negatives_and_the_cache_cost(capsys) -> None:
    assert main(["validate", str(GRADCACHE_SPEC)]) == 0
    assert "negatives    238 per anchor (2 x global_batch - 2" in capsys.readouterr().out
    assert main(["validate", str(GRADCACHE_SPEC), "--set", "train.gradient_cache=false"]) == 0
    assert "negatives    38 per anchor (2 x 5 micro x 4 ranks - 2)" in capsys.readouterr().out
    open_world = ["--set", "distributed.nodes=auto", "--set", "train.gradient_cache=false"]
    assert main(["validate", str(GRADCACHE_SPEC), *open_world]) == 0
    assert "2 x micro_batch x world size - 2 per anchor" in capsys.readouterr().out

    short = "train.max_steps=10"  # the LR curve is stepped per optimizer step; the rest does not depend on it
    text = plan_report(load_spec(GRADCACHE_SPEC, [short])).text
    assert "238 per anchor (2N-2, N = 120 pairs: every pair of the optimizer step, gradient cache)" in text
    # ResEnc-L at 160^3: 1.91 TFLOP per view forward; 5 x 6 pairs x 2 views per rank per step.
    assert "+115 TFLOP per step per rank (+33 % compute)" in text
    assert "embedding cache 0.9 MiB (embeddings of 60 views x 2048 and their gradients, fp32)" in text
    assert ", embedding cache 0.9 MiB = " in text  # counted in the memory estimate too
    plain = plan_report(load_spec(GRADCACHE_SPEC, [short, "train.gradient_cache=false"])).text
    assert "38 per anchor" in plain and "train.gradient_cache would make it 238" in plain and "grad cache" not in plain
    single = plan_report(load_spec(GRADCACHE_SPEC, [short, "train.micro_batch=30", "train.grad_accum=1"])).text
    assert "238 per anchor" in single and "not used: grad_accum 1" in single


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["train.global_batch=1", "train.micro_batch=auto"], "train.global_batch"),  # any world, any mode
        (["train.global_batch=4", "train.micro_batch=1", "distributed.procs_per_node=1"], "train.micro_batch"),
        (["train.global_batch=2", "train.grad_accum=2", "distributed.procs_per_node=auto"], "train.micro_batch"),
    ],
)
def test_degenerate_contrastive_batches_are_refused_by_validate(overrides: list[str], field: str, capsys) -> None:
    assert main(["validate", str(QUICKSTART), *[a for o in overrides for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(QUICKSTART) in err and field in err
    assert "negatives" in err


def test_the_cache_lifts_the_micro_times_world_rule() -> None:
    spec = load_spec(QUICKSTART, ["train.global_batch=4", "train.micro_batch=1", "distributed.procs_per_node=1"])
    with pytest.raises(BatchArithmeticError, match="gradient_cache"):
        check_batch(spec)
    assert working_world_sizes(spec) == [2, 4]  # 2 or 4 ranks of 1 pair: 2 or more pairs per micro-step
    spec = load_spec(QUICKSTART, ["train.global_batch=4", "train.micro_batch=1", "distributed.procs_per_node=1",
                                  "train.gradient_cache=true"])
    batch = check_batch(spec)
    assert (batch.micro_batch, batch.grad_accum, batch.negatives_per_anchor) == (1, 4, 6)
    assert working_world_sizes(spec) == [1, 2, 4]


def test_launch_refuses_a_degenerate_batch_before_any_rank_starts(tmp_path: Path, capsys) -> None:
    """The world size comes from the hostfile (1 slot): only `launch` can tell, and it must not start."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    args = ["launch", str(QUICKSTART), "--hostfile", str(hostfile), "--set", f"output_dir={tmp_path / 'runs'}",
            "--set", "distributed.procs_per_node=auto", "--set", "train.micro_batch=1", "--set", "train.global_batch=4"]
    assert main(["validate", str(QUICKSTART), *args[4:]]) == 0  # world size open: 2 or 4 ranks would work
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.micro_batch" in err and "1 rank" in err
    assert not (tmp_path / "runs").exists()
