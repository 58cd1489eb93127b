"""The one-screen summary `ds_simclr validate` prints."""

from __future__ import annotations

from pathlib import Path

from ds_simclr.dsconfig import check_batch
from ds_simclr.spec import RunSpec


def negatives_line(spec: RunSpec) -> str:
    """Negatives per anchor: a number when the world size is fixed (or the gradient cache makes it
    independent of it), else the formula. Raises BatchArithmeticError for a split that cannot work."""
    batch, train = check_batch(spec), spec.train
    if train.gradient_cache:
        return f"{2 * train.global_batch - 2} per anchor (2 x global_batch - 2: every pair of a step, gradient cache)"
    if batch is not None:
        return f"{batch.negatives_per_anchor} per anchor (2 x {batch.micro_batch} micro x {batch.world_size} ranks - 2)"
    return "2 x micro_batch x world size - 2 per anchor (accumulation adds none; see train.gradient_cache)"


def spec_summary(spec: RunSpec, spec_path: Path) -> str:
    """Key facts of a valid spec, one per line."""
    train, data = spec.train, spec.data
    source = "demo collection" if data.demo else str(data.store or data.manifest)
    micro = train.micro_batch if train.micro_batch != "auto" else "auto"
    return "\n".join(
        [
            f"{spec_path}: valid",
            f"  run          {spec.name} -> {spec.run_dir}",
            f"  data         {source}, patches {data.patch_size}^3",
            f"  views        {spec.views.output_size}^3",
            f"  model        {spec.model.encoder}, head {spec.model.head_layers} x {spec.model.head_hidden}"
            f" -> {spec.model.head_out}, temperature {spec.loss.temperature}",
            f"  batch        global {train.global_batch} pairs, micro {micro}, accumulation"
            f" {train.grad_accum or 'default'}",
            f"  negatives    {negatives_line(spec)}",
            f"  length       {train.total_steps:,} steps ({train.epochs} epochs x {train.steps_per_epoch}"
            + (f", stopped at {train.max_steps}" if train.max_steps else "")
            + ")",
            f"  optimizer    AdamW lr {spec.peak_lr:.3g}, wd {spec.optimizer.weight_decay}, warm-up"
            f" {spec.warmup_steps} steps, cosine to {spec.schedule.min_lr_ratio:g} x peak",
            f"  precision    {train.precision}, ZeRO-{train.zero_stage}, clip {train.grad_clip}",
            f"  launch       {spec.distributed.launcher}, nodes {spec.distributed.nodes}, ranks/node"
            f" {spec.distributed.procs_per_node}",
            f"  logging      W&B {spec.logging.wandb_mode}, every {spec.logging.log_every} steps;"
            f" checkpoints every {spec.checkpoint.every_steps}, keep {spec.checkpoint.keep_last}",
        ]
    )
