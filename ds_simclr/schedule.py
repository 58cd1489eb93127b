"""The LR schedule, computed by stepping DeepSpeed's own WarmupCosineLR on a dummy optimizer.

`plan` shows this curve and the engine runs the same class with the same parameters, so the two
cannot disagree. DeepSpeed's scheduler reports LR 0 until it is stepped once; `prime` takes that
first step before training so step 1 runs at the warm-up start LR (the peak when there is no
warm-up).
"""

from __future__ import annotations

import os
from typing import Any

from ds_simclr.dsconfig import optimizer_params, scheduler_params
from ds_simclr.spec import RunSpec


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
