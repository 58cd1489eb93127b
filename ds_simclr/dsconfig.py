"""Spec -> DeepSpeed JSON for the world size the job actually gets.

Pure arithmetic and dictionaries: no torch, no DeepSpeed import, so `config` starts fast. The LR
curve that `plan` shows lives in `schedule.py`, which steps DeepSpeed's own scheduler class with the
parameters built here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ds_simclr.errors import BatchArithmeticError
from ds_simclr.spec import RunSpec


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split: global = micro x accum x world."""

    world_size: int
    micro_batch: int
    grad_accum: int
    gradient_cache: bool = False
    """Contrast all pairs of an optimizer step (`train.gradient_cache`), not those of a micro-step."""

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def contrastive_batch(self) -> int:
        """Pairs N that NT-Xent contrasts: the whole step with the gradient cache, else micro x world."""
        return self.global_batch if self.gradient_cache else self.micro_batch * self.world_size

    @property
    def uses_gradient_cache(self) -> bool:
        """The step runs through the gradient cache: asked for, and more than one micro-step to cache."""
        return self.gradient_cache and self.grad_accum > 1

    @property
    def negatives_per_anchor(self) -> int:
        """Candidates an anchor is contrasted with, minus its positive: 2N - 2."""
        return 2 * self.contrastive_batch - 2


_LIFT = "set train.gradient_cache: true to contrast all pairs of a step, or raise micro_batch"


def plan_batch(spec: RunSpec, world_size: int) -> BatchPlan:
    """Apply DESIGN's batch rule; impossible arithmetic names the world sizes that work.

    Also refuses a contrastive batch of fewer than 2 pairs (micro x world = 1 without the gradient
    cache): its single pair has no negatives, so the loss and the gradient are 0.
    """
    if world_size < 1:
        raise BatchArithmeticError(f"world size must be positive, got {world_size}", where="--world-size")
    batch = _split(spec, world_size)
    train = spec.train
    if batch is None:
        raise BatchArithmeticError(
            f"global_batch {train.global_batch} cannot be split over {world_size} ranks"
            f" (micro_batch {train.micro_batch}, grad_accum {train.grad_accum or 'default'})",
            where=spec.where("train.global_batch"),
            hint=f"world sizes that work: {_format_sizes(working_world_sizes(spec))}",
        )
    if batch.contrastive_batch < 2:
        sizes = working_world_sizes(spec)
        raise BatchArithmeticError(
            f"micro_batch {batch.micro_batch} on {world_size} rank{'s' if world_size > 1 else ''} makes NT-Xent"
            f" contrast {batch.contrastive_batch} pair, which has no negatives (loss and gradient 0)",
            where=spec.where("train.micro_batch"),
            hint=_LIFT + (f"; world sizes that work: {_format_sizes(sizes)}" if sizes else ""),
        )
    return batch


def _split(spec: RunSpec, world_size: int) -> BatchPlan | None:
    """micro x accum for `world_size` ranks, or None when they do not come out whole."""
    train = spec.train
    if train.micro_batch == "auto":
        accum = train.grad_accum or 1
        micro, rest = divmod(train.global_batch, world_size * accum)
    elif train.grad_accum is None:
        micro = train.micro_batch
        accum, rest = divmod(train.global_batch, world_size * micro)
    else:
        micro, accum = train.micro_batch, train.grad_accum
        rest = train.global_batch - micro * accum * world_size
    if rest or micro < 1 or accum < 1:
        return None
    return BatchPlan(world_size=world_size, micro_batch=micro, grad_accum=accum, gradient_cache=train.gradient_cache)


def working_world_sizes(spec: RunSpec) -> list[int]:
    """Every world size for which the batch rule gives whole numbers and a contrastive batch of >= 2 pairs."""
    train = spec.train
    micro = train.micro_batch if isinstance(train.micro_batch, int) else 1
    accum = train.grad_accum or 1
    if train.micro_batch != "auto" and train.grad_accum is None:
        accum = 1  # any accumulation that comes out whole works
    unit = micro * accum
    if train.global_batch % unit:
        return []
    quotient = train.global_batch // unit
    candidates = [quotient] if train.micro_batch != "auto" and train.grad_accum is not None else range(1, quotient + 1)
    splits = (_split(spec, w) for w in candidates)
    return [b.world_size for b in splits if b is not None and b.contrastive_batch >= 2]


def fixed_world_size(spec: RunSpec) -> int | None:
    """nodes x procs_per_node when the spec fixes both, else None (the cluster decides)."""
    dist = spec.distributed
    if isinstance(dist.nodes, int) and isinstance(dist.procs_per_node, int):
        return dist.nodes * dist.procs_per_node
    return None


def check_batch(spec: RunSpec) -> BatchPlan | None:
    """What `validate` can check without a cluster: the split for a fixed world size, else that some
    world size works. Returns the plan when the world size is fixed; raises BatchArithmeticError."""
    world = fixed_world_size(spec)
    if world is not None:
        return plan_batch(spec, world)
    if not working_world_sizes(spec):
        train = spec.train
        raise BatchArithmeticError(
            f"no world size gives a contrastive batch of 2 or more pairs with global_batch {train.global_batch},"
            f" micro_batch {train.micro_batch}, grad_accum {train.grad_accum or 'default'}: a single pair has no"
            " negatives (loss and gradient 0)",
            where=spec.where("train.micro_batch"),
            hint=_LIFT,
        )
    return None


def _format_sizes(sizes: list[int]) -> str:
    if not sizes:
        return f"none with 2 or more pairs per micro-step over all ranks; {_LIFT}"
    shown = ", ".join(map(str, sizes[:16]))
    return shown + (", ..." if len(sizes) > 16 else "")


def scheduler_params(spec: RunSpec) -> dict[str, Any]:
    """WarmupCosineLR parameters: linear warm-up, cosine to `min_lr_ratio`, per optimizer step.

    DeepSpeed refuses 0 warm-up steps; "no warm-up" is expressed as one warm-up step that starts at
    the peak (ratio 1.0). The engine primes the scheduler once before the first step (see
    `schedule.prime`), so the first step runs at the warm-up start LR instead of 0.
    """
    warmup = spec.warmup_steps
    return {
        "total_num_steps": spec.train.total_steps,
        "warmup_num_steps": max(1, warmup),
        "warmup_min_ratio": spec.schedule.warmup_start_ratio if warmup > 0 else 1.0,
        "cos_min_ratio": spec.schedule.min_lr_ratio,
        "warmup_type": "linear",
    }


def optimizer_params(spec: RunSpec) -> dict[str, Any]:
    """AdamW through torch's implementation (`torch_adam`): compiles nothing on any machine."""
    opt = spec.optimizer
    return {
        "lr": spec.peak_lr,
        "betas": list(opt.betas),
        "eps": opt.eps,
        "weight_decay": opt.weight_decay,
        "torch_adam": True,
        "adam_w_mode": True,
    }


def deepspeed_config(spec: RunSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for `world_size` ranks."""
    batch = plan_batch(spec, world_size)
    bf16 = spec.train.precision == "bf16"
    config: dict[str, Any] = {
        "train_batch_size": batch.global_batch,
        "train_micro_batch_size_per_gpu": batch.micro_batch,
        "gradient_accumulation_steps": batch.grad_accum,
        "gradient_clipping": spec.train.grad_clip,
        "zero_optimization": {"stage": spec.train.zero_stage},
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": optimizer_params(spec)},
        "scheduler": {"type": "WarmupCosineLR", "params": scheduler_params(spec)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # Buffers (e.g. norm statistics) in bf16 too; fp32 buffers break bf16 BatchNorm on CPU.
        config["data_types"] = {"buffer_dtype": "bf16"}
    return config
