"""`ds_simclr plan`: what a spec will do on W ranks, computed without building anything heavy.

Parameter counts and activation sizes come from the architecture table (no model import); the LR
milestones come from DeepSpeed's own scheduler (`schedule.planned_lrs`), each labelled by what it is:
the step at the highest LR (`peak` when it is exactly the peak), the first cosine step, the last step.
The memory section (`memory_lines`) estimates the peak per GPU and warns, with the fix, when it
exceeds `distributed.gpu_memory_gib`.
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


@dataclass(frozen=True)
class Activations:
    """Elements the encoder keeps for backward, per view (see `activation_elements`)."""

    plain: int
    """Everything autograd saves in one forward."""
    boundaries: int
    """With checkpointing: the inputs of the stem and of every stage (what the forward keeps)."""
    largest_segment: int
    """With checkpointing: the saved maps of the biggest segment (stem or stage), recomputed in backward."""
    largest_map: int
    """The largest feature map (the gradients flowing through one layer in backward are ~2 of them)."""

    @property
    def checkpointed(self) -> int:
        """Peak with checkpointing: the boundaries plus one recomputed segment."""
        return self.boundaries + self.largest_segment


def activation_elements(arch: EncoderArch, size: int, in_channels: int) -> Activations:
    """What the encoder keeps for backward per view of `size`^3, counted from its blocks.

    Plain counts what autograd saves in our ResEnc blocks: the stem's input and two maps (conv
    output, normalised output; LeakyReLU works in place), four maps per basic block (two per
    conv-norm), plus the skip's 1x1 conv output and its average-pooled input in a stage's first
    block. Calibrated against the bytes counted with saved_tensors_hooks in one forward: equal
    within 0.1 % (the norms' statistics) at 64^3 for resenc_l (351.1 MiB fp32, batch 1) and
    resenc_s (147.3 MiB), and at 32^3 for resenc_tiny (tests/test_planning.py repeats the small
    ones); every term scales with the volume. Checkpointed (`train.activation_checkpointing`): the
    forward keeps the inputs of the stem and of every stage; backward recomputes one segment at a
    time, whose saved maps come on top.
    """
    volume = size**3
    segments = [2 * arch.features[0] * volume]  # the stem
    boundaries = in_channels * volume + arch.features[0] * volume  # the views, the stem's output
    largest_map = arch.features[0] * volume
    c_in, edge = arch.features[0], size
    for c_out, blocks, stride in zip(arch.features, arch.blocks, arch.strides):
        edge //= stride
        voxels = edge**3
        saved = 4 * c_out * voxels * blocks
        if stride != 1 or c_in != c_out:
            saved += c_out * voxels + (c_in * voxels if stride != 1 else 0)
        segments.append(saved)
        boundaries += c_out * voxels
        largest_map = max(largest_map, c_out * voxels)
        c_in = c_out
    boundaries -= arch.features[-1] * edge**3  # the last stage's output is only pooled: nothing keeps it
    return Activations(in_channels * volume + sum(segments), boundaries, max(segments), largest_map)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one GPU in bytes, by part (see `memory_estimate`)."""

    parts: dict[str, float]
    activations_plain: float
    activations_checkpointed: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def memory_estimate(spec: RunSpec, batch: BatchPlan, micro_batch: int | None = None) -> MemoryEstimate:
    """Weights, gradients and optimizer shards (ZeRO), activations of one micro-batch (both views)
    and the loss's logits.

    Plain, the peak is at the start of backward, when everything saved is alive (by the time
    backward reaches the full-resolution layers, whose gradients are the big ones, the deeper
    layers' saved maps are freed). Checkpointed, it is during the recomputation of the biggest
    segment at full resolution: the boundaries, that segment's maps and about two full-resolution
    gradients ("recompute gradients").

    With the gradient cache (accumulation on), the logits are those of the whole step (this rank's
    pairs of every micro-batch against all pairs of the step; counted with the activations although
    they are freed before the second forward) and the embedding cache comes on top.

    Not counted: cuDNN workspaces, DeepSpeed's communication buckets and allocator slack; compare
    with the GPU suite's measured peak (`benchmarks/gpu_suite.py`).
    """
    micro = micro_batch or batch.micro_batch
    arch = ENCODERS[spec.model.encoder]
    params = encoder_parameters(arch, spec.model.in_channels) + head_parameters(spec)
    element = 2 if spec.train.precision == "bf16" else 4
    views = 2 * micro
    acts = activation_elements(arch, spec.views.output_size, spec.model.in_channels)
    cached = batch.gradient_cache and batch.grad_accum * batch.micro_batch > micro  # accumulation with the cache
    if cached:  # one NT-Xent over the step: this rank's pairs of all micro-batches against all pairs
        anchors, pairs = 2 * batch.micro_batch * batch.grad_accum, batch.global_batch
    else:
        anchors, pairs = 2 * micro, micro * batch.world_size  # N: pairs every anchor is scored against
    logits = 4 * (2 * anchors * (2 * pairs) + 2 * (2 * pairs) * spec.model.head_out)  # fp32 logits, softmax, candidates
    parts = dict(state_bytes_per_rank(params, spec, batch.world_size))
    if spec.train.activation_checkpointing:
        parts["activations"] = views * acts.checkpointed * element
        parts["recompute gradients"] = views * 2 * acts.largest_map * element
    else:
        parts["activations"] = views * acts.plain * element
    parts["logits"] = logits
    if cached:
        parts["embedding cache"] = embedding_cache_bytes(spec, batch)
    checkpointed_peak = views * (acts.checkpointed + 2 * acts.largest_map) * element
    return MemoryEstimate(parts, views * acts.plain * element, checkpointed_peak)


def memory_lines(spec: RunSpec, batch: BatchPlan) -> list[str]:
    """The plan's memory section: the estimate by part, and a warning with the fix when it does not fit."""
    estimate = memory_estimate(spec, batch)
    budget = spec.distributed.gpu_memory_gib * 2**30
    shape = f"2 views x {batch.micro_batch} x {spec.views.output_size}^3"
    lines = [
        "  memory/GPU   " + ", ".join(f"{name} {_size(value)}" for name, value in estimate.parts.items())
        + f" = {_size(estimate.total)} (estimate; GPU {spec.distributed.gpu_memory_gib:g} GiB)",
        f"  activations  {_size(estimate.activations_plain)} plain, {_size(estimate.activations_checkpointed)} with"
        f" train.activation_checkpointing ({shape}"
        f"{', on' if spec.train.activation_checkpointing else ''})",
    ]
    if estimate.total <= budget:
        return lines
    fixes, best, smallest = [], 0, batch.micro_batch
    divisors = [m for m in range(batch.micro_batch, 0, -1) if batch.micro_batch % m == 0]
    for checkpointing in sorted({spec.train.activation_checkpointing, True}):
        option = spec.model_copy(update={"train": spec.train.model_copy(update={"activation_checkpointing": checkpointing})})
        micro = next((m for m in divisors if memory_estimate(option, batch, m).total <= budget), 0)
        if micro <= best:
            continue
        best, smallest = micro, min(smallest, micro)
        accum = batch.grad_accum * batch.micro_batch // micro
        change = ["train.activation_checkpointing: true"] if checkpointing and not spec.train.activation_checkpointing else []
        change += [f"train.micro_batch {micro} + train.grad_accum {accum}"] if micro < batch.micro_batch else []
        fixes.append(" and ".join(change) + f" (~{_size(memory_estimate(option, batch, micro).total)})")
    note = ""
    if smallest < batch.micro_batch:
        note = (
            f"; the gradient cache keeps {batch.negatives_per_anchor} negatives per anchor"
            if batch.gradient_cache
            else f"; accumulation alone cuts the negatives per anchor to 2 x micro_batch x {batch.world_size} - 2"
            " (train.gradient_cache: true keeps all the step's pairs)"
        )
    lines.append(
        f"  WARNING      ~{_size(estimate.total)} per GPU exceeds distributed.gpu_memory_gib"
        f" {spec.distributed.gpu_memory_gib:g}; fix: " + ("; or ".join(fixes) if fixes else "none fits one pair") + note
    )
    return lines


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


def embedding_cache_bytes(spec: RunSpec, batch: BatchPlan) -> int:
    """What the gradient cache keeps through a step per rank: the step's embeddings and their
    gradients, fp32, (2 x micro x accum, D) each. Not the views: the loader makes them again."""
    return 2 * (2 * batch.micro_batch * batch.grad_accum * spec.model.head_out * 4)


def gradient_cache_lines(spec: RunSpec, batch: BatchPlan) -> list[str]:
    """What the gradient cache costs per rank: one extra forward per micro-batch (a backward costs about
    two forwards, so about a third more compute), views made twice, and the embedding cache."""
    if not batch.gradient_cache:
        return []
    if batch.grad_accum == 1:
        return ["  grad cache   not used: grad_accum 1, one micro-step already holds every pair of the step"]
    pairs = batch.micro_batch * batch.grad_accum  # per rank per step
    arch = ENCODERS[spec.model.encoder]
    extra = 2 * pairs * encoder_forward_flops(arch, spec.model.in_channels, spec.views.output_size)
    return [
        f"  grad cache   +1 forward per micro-batch: +{extra / 1e12:.3g} TFLOP per step per rank (+33 % compute);"
        f" views made twice; embedding cache {_size(embedding_cache_bytes(spec, batch))} (embeddings of {2 * pairs}"
        f" views x {spec.model.head_out} and their gradients, fp32)",
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
        *memory_lines(spec, batch),
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
