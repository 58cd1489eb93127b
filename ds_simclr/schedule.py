"""The LR schedule, computed by stepping DeepSpeed's own WarmupCosineLR on a dummy optimizer.

`plan` shows this curve and the engine runs the same class with the same parameters, so the two
cannot disagree. DeepSpeed's scheduler reports LR 0 until it is stepped once; `prime` takes that
first step before training so step 1 runs at the warm-up start LR (the peak when there is no
warm-up).

What DeepSpeed 0.19's WarmupCosineLR does at the boundary (read from its `get_lr_ratio`, checked
against the class in the tests): warm-up lasts max(2, warmup_num_steps) steps and step k of it runs
at `warmup_min_ratio + (k - 1) / warmup x (1 - warmup_min_ratio)`, so it never reaches the peak; the
cosine starts on the next step, already one step down (`1 / (total - warmup)` of its way), and the
last step runs at the floor. `schedule_warning` needs no torch: `validate` uses it.
"""

from __future__ import annotations

import math
import os
from typing import Any

from ds_simclr.dsconfig import optimizer_params, scheduler_params
from ds_simclr.spec import RunSpec

NEAR_PEAK = 0.9
"""A run whose highest LR stays below this fraction of the peak gets a warning."""


def prime(scheduler: Any) -> None:
    """Step a fresh scheduler once so that optimizer step 1 sees the warm-up start LR."""
    if scheduler.last_batch_iteration < 0:
        scheduler.step()


def planned_lrs(spec: RunSpec) -> list[float]:
    """LR used at each optimizer step 1..total_steps, exactly as the engine will use it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the plan needs no accelerator
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from deepspeed.utils import logger

    logger.setLevel("ERROR")  # the scheduler warns when read before its first step
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optimizer_params(spec)["lr"])
    scheduler = WarmupCosineLR(optimizer, **scheduler_params(spec))
    prime(scheduler)
    lrs = []
    for _ in range(spec.train.total_steps):
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        scheduler.step()
    return lrs


def warmup_span(spec: RunSpec) -> int:
    """Optimizer steps DeepSpeed spends in warm-up: max(2, warmup_num_steps), flat at the peak when
    the spec has no warm-up. The step after it is the first cosine step."""
    return max(2, scheduler_params(spec)["warmup_num_steps"])


def lr_ratio(spec: RunSpec, step: int) -> float:
    """LR of optimizer step `step` (1-based) as a fraction of the peak: DeepSpeed's linear
    WarmupCosineLR formula, primed as the engine primes it (no torch needed)."""
    params = scheduler_params(spec)
    span, total = warmup_span(spec), params["total_num_steps"]
    iteration = step - 1  # the scheduler's last_batch_iteration when step `step` runs
    if iteration < span:
        start = params["warmup_min_ratio"]
        return start + iteration / span * (1.0 - start)
    progress = min(1.0, (iteration - span + 1) / max(1, total - span))
    floor = params["cos_min_ratio"]
    return max(0.0, floor + (1.0 - floor) * (1 + math.cos(math.pi * progress)) / 2)


def highest_step(spec: RunSpec) -> int:
    """The first optimizer step that runs at the run's highest LR: the end of the warm-up or the
    first cosine step (the warm-up only rises and the cosine only falls)."""
    total, span = spec.train.total_steps, warmup_span(spec)
    candidates = [min(span, total)] + ([span + 1] if span + 1 <= total else [])
    best = max(lr_ratio(spec, step) for step in candidates)
    return next(step for step in range(1, total + 1) if lr_ratio(spec, step) >= best)


def schedule_warning(spec: RunSpec) -> str | None:
    """One line when the run never comes near its peak LR (warm-up about as long as the run), else None."""
    step = highest_step(spec)
    ratio = lr_ratio(spec, step)
    if ratio >= NEAR_PEAK:
        return None
    given = "schedule.warmup_epochs" if spec.schedule.warmup_epochs is not None else "schedule.warmup_steps"
    total, span = spec.train.total_steps, warmup_span(spec)
    why = (
        f"the run ({total} steps) ends inside the warm-up ({span} steps)"
        if span >= total
        else f"the warm-up takes {span} of its {total} steps"
    )
    return (
        f"{spec.where(given)}: the LR never comes near its peak {spec.peak_lr:.3g}: {why}, so the highest is"
        f" {ratio * spec.peak_lr:.3g} ({ratio:.0%} of the peak) at step {step} (shorten the warm-up or"
        " lengthen the run)"
    )
