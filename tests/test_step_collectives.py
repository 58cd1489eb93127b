"""What a training step costs in collectives and host syncs, counted on 2 real gloo ranks.

Every `torch.distributed` collective is wrapped (before DeepSpeed or `ds_simclr.dist` take
references to them) and attributed to whichever of ds_simclr or DeepSpeed called it. Per optimizer
step that is not logged, with grad_accum 1, ds_simclr may run the loss's one all-gather forward, its
one reduce-scatter backward and one small all-reduce (finiteness and stop request together), and
read one value back to the host. DeepSpeed's own gradient reduction is counted apart and printed.
"""

from __future__ import annotations

import collections
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import tiny_spec_mapping
from multiproc import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_single", "all_gather_into_tensor",
    "_all_gather_base", "all_gather_object", "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor",
    "_reduce_scatter_base", "reduce", "broadcast", "broadcast_object_list", "barrier", "gather", "scatter",
    "all_to_all", "all_to_all_single",
)
SAME = {"all_gather_single": "all_gather_into_tensor", "reduce_scatter_single": "reduce_scatter_tensor"}
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")
STOP_AT = 4  # rank 1 asks to stop at this step: steps before it are neither logged nor checkpointed


def _caller(frame: Any) -> str:
    """The innermost of ds_simclr and DeepSpeed on the stack ('other' when neither)."""
    while frame is not None:
        name = frame.f_code.co_filename
        if "/ds_simclr/" in name:
            return "ds_simclr"
        if "/deepspeed/" in name:
            return "deepspeed"
        frame = frame.f_back
    return "other"


def _counting_worker(mapping: dict) -> dict[str, Any]:
    assert "ds_simclr.dist" not in sys.modules, "wrap the collectives before ds_simclr.dist keeps references"
    import torch
    import torch.distributed as tdist
    import torch.distributed.distributed_c10d as c10d

    events: list[tuple] = []  # ("step", n) markers, then (caller, collective, numel) / (caller, "host read")
    inside = threading.local()

    def wrap(fn: Any, record: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            outermost = not getattr(inside, "depth", 0) and threading.current_thread() is threading.main_thread()
            if outermost:
                events.append(record(args, kwargs))
            inside.depth = getattr(inside, "depth", 0) + 1
            try:
                return fn(*args, **kwargs)
            finally:
                inside.depth -= 1

        return counted

    for name in COLLECTIVES:
        fn = getattr(c10d, name, None)
        if fn is None:
            continue

        def record(args: tuple, kwargs: dict, name: str = name) -> tuple:
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("tensor")
            return (_caller(sys._getframe(2)), SAME.get(name, name), tensor.numel() if tensor is not None else None)

        setattr(c10d, name, wrap(fn, record))
        setattr(tdist, name, getattr(c10d, name))
    for name in HOST_READS:
        setattr(torch.Tensor, name, wrap(getattr(torch.Tensor, name), lambda a, k: (_caller(sys._getframe(2)), "host read")))

    from ds_simclr.engine import Trainer
    from ds_simclr.specload import spec_from_mapping

    trainer = Trainer(spec_from_mapping(mapping))
    real_step = trainer._optimizer_step

    def marked_step(batches: Any, stop_requested: bool = False) -> Any:
        step = trainer.state.step + 1
        events.append(("step", step))
        return real_step(batches, stop_requested or (step == STOP_AT and tdist.get_rank() == 1))

    trainer._optimizer_step = marked_step
    result = trainer.run()
    per_step: dict[int, dict[str, collections.Counter]] = {}
    step = 0
    for event in events:
        if event[0] == "step":
            step = event[1]
            per_step[step] = {"ds_simclr": collections.Counter(), "deepspeed": collections.Counter(), "other": collections.Counter()}
        elif step:
            caller, what = event[0], event[1]
            size = f"[{event[2]}]" if what == "all_reduce" and caller == "ds_simclr" else ""
            per_step[step][caller][what + size] += 1
    return {"per_step": {s: {k: dict(v) for k, v in c.items()} for s, c in per_step.items()},
            "steps_done": result.steps_done, "stopped_early": result.stopped_early}


def test_a_step_that_is_not_logged_costs_one_gather_one_scatter_one_small_all_reduce(demo_cache: Path, tmp_path: Path) -> None:
    mapping = tiny_spec_mapping(demo_cache, tmp_path, precision="bf16", max_steps=6)
    mapping["logging"]["log_every"] = 100
    ranks = run_ranks(_counting_worker, 2, mapping)
    for rank, result in enumerate(ranks):
        for step, counts in sorted(result["per_step"].items()):
            print(f"rank {rank} step {step}: ds_simclr {counts['ds_simclr']}; DeepSpeed {counts['deepspeed']}"
                  f"; other {counts['other']}")
    for result in ranks:  # rank 1's stop request, agreed with step 4's loss, stops both after step 4
        assert result["stopped_early"] and result["steps_done"] == STOP_AT
        for step in range(1, STOP_AT):
            counts = result["per_step"][step]
            assert counts["ds_simclr"] == {
                "all_gather_into_tensor": 1, "reduce_scatter_tensor": 1, "all_reduce[2]": 1, "host read": 1,
            }
            assert counts["other"] == {}
        logged = result["per_step"][STOP_AT]["ds_simclr"]  # logged and checkpointed: metrics, then the save
        assert logged["all_gather_into_tensor"] > 1 and logged["host read"] > 1
