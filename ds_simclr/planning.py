"""`ds_simclr plan`: what a spec will do on W ranks, computed without building anything heavy.

Parameter counts and activation sizes come from the architecture table (no model import); the LR
milestones come from DeepSpeed's own scheduler (`schedule.planned_lrs`), each labelled by what it is:
the step at the highest LR (`peak` when it is exactly the peak), the first cosine step, the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ds_simclr.architectures import ENCODERS, EncoderArch
from ds_simclr.dsconfig import BatchPlan, fixed_world_size, plan_batch
from ds_simclr.spec import RunSpec


def _size(n_bytes: float) -> str:
    """Bytes as MiB below 1 GiB, else GiB."""
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


@dataclass(frozen=True)
class PlanReport:
    """The plan as text plus the LR per optimizer step (for the plot)."""

    text: str
    lrs: list[float]
    batch: BatchPlan


def default_world_size(spec: RunSpec) -> int:
    """nodes x procs_per_node when the spec fixes both, else 1."""
    return fixed_world_size(spec) or 1


def encoder_parameters(arch: EncoderArch, in_channels: int) -> int:
    """Parameters of a ResEnc encoder: conv weights + biases, norm affines, 1x1 skip projections."""
    k3 = arch.kernel_size**3

    def conv_norm(cin: int, cout: int, kernel_volume: int, bias: bool) -> int:
        return cin * cout * kernel_volume + (cout if bias else 0) + 2 * cout

    total = conv_norm(in_channels, arch.features[0], k3, True)  # stem
    cin = arch.features[0]
    for cout, blocks, stride in zip(arch.features, arch.blocks, arch.strides):
        for block in range(blocks):
            total += conv_norm(cin, cout, k3, True) + conv_norm(cout, cout, k3, True)
            if block == 0 and cin != cout:
                total += conv_norm(cin, cout, 1, False)
            cin = cout
    return total


def head_parameters(spec: RunSpec) -> int:
    """Parameters of the MLP head: linear layers (its per-sample norms have no parameters)."""
    model = spec.model
    widths = [ENCODERS[model.encoder].feature_dim]
    widths += [model.head_hidden] * (model.head_layers - 1) + [model.head_out]
    total = 0
    for cin, cout in zip(widths, widths[1:]):
        total += cin * cout + cout
    return total


def activation_bytes(spec: RunSpec, micro_batch: int) -> int:
    """Rough size of the tensors kept for backward in one micro-step (both views).

    Each residual block keeps about five feature maps (two conv outputs, two normalised maps with
    the activation in place, the sum), the stem two; the head's are negligible. An estimate to size micro_batch, not a promise.
    """
    arch = ENCODERS[spec.model.encoder]
    size = spec.views.output_size
    elements = 2 * arch.features[0] * size**3
    for features, blocks, stride in zip(arch.features, arch.blocks, arch.strides):
        size = max(1, size // stride)
        elements += 5 * blocks * features * size**3
    bytes_per_element = 2 if spec.train.precision == "bf16" else 4
    return 2 * micro_batch * elements * bytes_per_element


def encoder_forward_flops(arch: EncoderArch, in_channels: int, size: int) -> int:
    """FLOPs (2 per multiply-add) of the encoder's convolutions for one view of `size`^3 voxels.

    Norms, activations, pooling and the head are left out (< 1 %). ResEnc-L at 160^3: 1.91 TFLOP,
    what torch's FlopCounterMode counts for the seed's network.
    """
    k3 = arch.kernel_size**3
    flops = 2 * in_channels * arch.features[0] * k3 * size**3  # stem
    cin = arch.features[0]
    for cout, blocks, stride in zip(arch.features, arch.blocks, arch.strides):
        size = max(1, size // stride)
        voxels = size**3
        for block in range(blocks):
            flops += 2 * (cin + cout) * cout * k3 * voxels  # conv1 (cin -> cout), conv2 (cout -> cout)
            if block == 0 and cin != cout:
                flops += 2 * cin * cout * voxels  # 1x1 skip projection
            cin = cout
    return flops


def gradient_cache_lines(spec: RunSpec, batch: BatchPlan) -> list[str]:
    """What the gradient cache costs per rank: one extra forward per micro-batch, and what it keeps.

    Kept through the step: the embeddings and their gradients (fp32, (2 x micro x accum, D) each) and
    the loss's fp32 logits and their gradient ((2 x micro x accum) x 2N each); not the views, which the
    loader makes again for the second forward. A backward costs about two forwards, so the extra forward
    adds about a third of the step's compute.
    """
    if not batch.gradient_cache:
        return []
    if batch.grad_accum == 1:
        return ["  grad cache   not used: grad_accum 1, one micro-step already holds every pair of the step"]
    pairs = batch.micro_batch * batch.grad_accum  # per rank per step
    arch = ENCODERS[spec.model.encoder]
    extra = 2 * pairs * encoder_forward_flops(arch, spec.model.in_channels, spec.views.output_size)
    embeddings = 2 * (2 * pairs * spec.model.head_out * 4)
    logits = 2 * (2 * pairs * 2 * batch.global_batch * 4)
    return [
        f"  grad cache   +1 forward per micro-batch: +{extra / 1e12:.3g} TFLOP per step per rank (+33 % compute);"
        " views made twice",
        f"  cache        {_size(embeddings + logits)} per rank: embeddings of {2 * pairs} views x"
        f" {spec.model.head_out}, their gradients and the logits (fp32)",
    ]


def state_bytes_per_rank(parameters: int, spec: RunSpec, world_size: int) -> dict[str, float]:
    """Weights, gradients and optimizer state per rank; ZeRO >= 1 shards the fp32 state."""
    shards = world_size if spec.train.zero_stage >= 1 else 1
    if spec.train.precision == "bf16":
        weights, grads, master = 2 * parameters, 2 * parameters, 4 * parameters / shards
    else:
        weights, grads, master = 4 * parameters, 4 * parameters, 0.0
    adam = 8 * parameters / shards
    return {"weights": weights, "grads": grads, "fp32 master": master, "Adam moments": adam}


def _contrasted(batch: BatchPlan) -> str:
    """Which pairs N counts, in words."""
    if batch.gradient_cache:
        return f"N = {batch.contrastive_batch} pairs: every pair of the optimizer step, gradient cache"
    text = f"N = {batch.contrastive_batch} pairs per micro-step over all ranks"
    if batch.grad_accum > 1:
        text += f"; accumulation adds none, train.gradient_cache would make it {2 * batch.global_batch - 2}"
    return text


def lr_milestones(lrs: list[float], peak: float, warmup_span: int) -> list[tuple[str, int]]:
    """(label, step) of the first step at the highest LR, the first cosine step and the last step;
    labels of one step are joined (`highest = last step`). `lrs[k - 1]` is step k's LR."""
    total = len(lrs)
    highest = lrs.index(max(lrs)) + 1
    labels: dict[int, list[str]] = {highest: ["peak" if math.isclose(lrs[highest - 1], peak, rel_tol=1e-9) else "highest"]}
    if warmup_span + 1 <= total:
        labels.setdefault(warmup_span + 1, []).append("first cosine step")
    labels.setdefault(total, []).append("last step")
    return [(" = ".join(names), step) for step, names in sorted(labels.items())]


def _lr_line(spec: RunSpec, lrs: list[float]) -> str:
    from ds_simclr.schedule import warmup_span

    span = warmup_span(spec)
    warmup = f"warm-up {span} steps" if spec.warmup_steps else "no warm-up"
    if span >= len(lrs):
        warmup += " (the run ends inside it: no cosine step)"
    marks = lr_milestones(lrs, spec.peak_lr, span)
    return f"peak {spec.peak_lr:.3g}, {warmup}; " + "; ".join(f"{name} (step {step:,}) {lrs[step - 1]:.4g}" for name, step in marks)


def plan_report(spec: RunSpec, world_size: int | None = None) -> PlanReport:
    """Compute the plan for `world_size` ranks (default: from the spec)."""
    from ds_simclr.schedule import planned_lrs

    world = world_size or default_world_size(spec)
    batch = plan_batch(spec, world)
    lrs = planned_lrs(spec)
    total = spec.train.total_steps
    arch = ENCODERS[spec.model.encoder]
    encoder, head = encoder_parameters(arch, spec.model.in_channels), head_parameters(spec)
    params = encoder + head
    state = state_bytes_per_rank(params, spec, world)
    activations = activation_bytes(spec, batch.micro_batch)
    epochs = f"{total / spec.train.steps_per_epoch:g} epochs x {spec.train.steps_per_epoch} steps"
    lines = [
        f"plan for {spec.name} on {world} rank{'s' if world > 1 else ''}",
        f"  batch        {batch.global_batch} pairs/step = {batch.micro_batch} micro x"
        f" {batch.grad_accum} accumulation x {world} ranks",
        f"  negatives    {batch.negatives_per_anchor} per anchor (2N-2, {_contrasted(batch)})",
        f"  steps        {total:,} optimizer steps ({epochs})",
        f"  lr           {_lr_line(spec, lrs)}",
        f"  model        {spec.model.encoder}, {params:,} parameters (encoder {encoder:,} + head {head:,}),"
        f" {spec.train.precision},"
        f" ZeRO-{spec.train.zero_stage}",
        "  memory/rank  "
        + ", ".join(f"{name} {_size(value)}" for name, value in state.items())
        + f" = {_size(sum(state.values()))}",
        f"  activations  ~{_size(activations)} per micro-batch (2 views x {batch.micro_batch} x"
        f" {spec.views.output_size}^3, estimate)",
        *gradient_cache_lines(spec, batch),
    ]
    return PlanReport(text="\n".join(lines), lrs=lrs, batch=batch)


def plot_lr_curve(lrs: list[float], path: Path, title: str, realised: list[tuple[int, float]] | None = None) -> None:
    """PNG of the planned LR per optimizer step, with the realised LR on top when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(range(1, len(lrs) + 1), lrs, label="planned", color="tab:blue")
    if realised:
        steps, values = zip(*realised)
        ax.plot(steps, values, "o", markersize=3, label="realised", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
