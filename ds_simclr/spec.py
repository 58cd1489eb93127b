"""The run spec's schema: one validated document that every other artefact is derived from.

The strict models below say what a run is; `ds_simclr.specload` reads them from YAML (`load_spec`,
`--set` overrides, one-line errors). Nothing heavy is imported here: `validate` and `config` must
start fast.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from ds_simclr.architectures import check_input_shape
from ds_simclr.data.options import DataSpec, ViewsSpec
from ds_simclr.evaluation.options import EvalSpec
from ds_simclr.specbase import StrictModel

EncoderName = Literal["resenc_l", "resenc_s", "resenc_tiny"]

# Fields that may differ between a run's saved spec and the spec it is resumed with.
RESUME_MUTABLE_FIELDS = frozenset(
    {
        "train.max_steps",
        "train.epochs",
        "output_dir",
        "data.num_workers",
        "data.prefetch",
        "data.max_open_files",
        "data.cache_dir",
        "views.device",
        "train.activation_checkpointing",
        "train.channels_last",
        "train.compile",
        "distributed",
        "checkpoint",
        "logging",
        "eval",
    }
)


class ModelSpec(StrictModel):
    """The encoder and the projection head."""

    encoder: EncoderName = "resenc_l"
    """Encoder architecture. `resenc_l` is nnSSL's ResEnc-L (90 M parameters, nnSSL state-dict
    names, loadable by nnU-Net/nnSSL adaptation code); `resenc_s` and `resenc_tiny` are smaller
    members of the same family for CPU runs and tests."""

    in_channels: int = Field(1, ge=1)
    """Input channels per sample. Only 1 is supported (nnSSL pretrains with 1): the data path reads
    one image per sample and stacks no modalities; to train on several modalities, list them in
    `data.modalities` and each image becomes a sample of its own."""

    head_hidden: int = Field(2048, ge=1)
    """Width of the projection head's hidden layers (nnSSL: 2048)."""

    head_out: int = Field(2048, ge=1)
    """Dimension of the projection the loss sees (nnSSL: 2048)."""

    head_layers: int = Field(3, ge=1, le=8)
    """Linear layers in the projection head (nnSSL: 3)."""

    init_from: Path | None = None
    """Start from the weights of an export (`ds_simclr export`, or an nnSSL adaptation checkpoint)
    instead of a random initialisation: its encoder must match `encoder` with 1 input channel; its
    projection head is taken when the shapes match `head_*`, else the head starts random. Only a
    fresh run uses it (a resumed run continues from its checkpoint)."""

    @field_validator("in_channels")
    @classmethod
    def _single_channel(cls, channels: int) -> int:
        if channels != 1:
            raise ValueError(
                "only 1 is supported: samples are single images, no modalities are stacked"
                " (list modalities in data.modalities to train on each as its own sample)"
            )
        return channels


class LossSpec(StrictModel):
    """NT-Xent (SimCLR) loss."""

    temperature: float = Field(0.5, gt=0.0, le=10.0)
    """Softmax temperature of the cosine similarities. Lower sharpens the contrast between the
    positive and the hardest negatives; the recipe uses 0.5."""


class OptimizerSpec(StrictModel):
    """AdamW (the recipe's Adam is AdamW with weight decay 0)."""

    lr: float = Field(3e-4, gt=0.0, le=10.0)
    """Peak learning rate, before any batch scaling (see `lr_scaling`)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates, each in [0, 1)."""

    eps: float = Field(1e-8, gt=0.0, le=1.0)
    """Adam's denominator epsilon."""

    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    """Decoupled weight decay (AdamW). 0 reproduces plain Adam."""

    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale `lr` by the global batch: `linear` multiplies by global_batch / base_batch, `sqrt` by
    its square root. Derived from the global batch, never from the per-rank batch."""

    base_batch: int = Field(256, ge=1)
    """Reference global batch (pairs) at which `lr` is meant, for `lr_scaling`."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError("each beta must be in [0, 1), e.g. [0.9, 0.999]")
        return betas


class ScheduleSpec(StrictModel):
    """Linear warm-up then cosine annealing, stepped once per optimizer step by DeepSpeed's
    WarmupCosineLR."""

    warmup_steps: int | None = Field(None, ge=0)
    """Warm-up length in optimizer steps (0 = none). Give this or `warmup_epochs`, not both."""

    warmup_epochs: float | None = Field(None, ge=0.0)
    """Warm-up length in epochs, converted with `train.steps_per_epoch`."""

    warmup_start_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """LR at the start of warm-up, as a fraction of the peak LR."""

    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """LR at the end of the cosine, as a fraction of the peak LR."""

    @model_validator(mode="after")
    def _one_warmup(self) -> ScheduleSpec:
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError("give warmup_steps or warmup_epochs, not both")
        return self


class TrainSpec(StrictModel):
    """Batch arithmetic, length, precision and stability of the run."""

    global_batch: int = Field(ge=1)
    """Pairs per optimizer step over all ranks (= micro_batch x grad_accum x world size).
    Negatives per anchor are 2 x micro_batch x world size - 2 (accumulation adds none), or
    2 x global_batch - 2 with `gradient_cache`. At least 2 pairs: one pair has no negatives."""

    micro_batch: int | Literal["auto"] = "auto"
    """Pairs per rank per micro-step, or `auto`: global_batch / (world size x grad_accum), which
    must be a whole number for the world size the job gets."""

    grad_accum: int | None = Field(None, ge=1)
    """Micro-steps per optimizer step. Default: 1 with `micro_batch: auto`, otherwise whatever
    makes the global batch come out."""

    gradient_cache: bool = False
    """Make every pair of an optimizer step a negative for every other (all micro-batches of all
    ranks, 2 x global_batch - 2 negatives per anchor) with the activation memory of one
    micro-batch: each micro-batch is forwarded once without a graph, the loss and its gradient
    with respect to the embeddings of the whole step are computed, then each micro-batch is
    forwarded again (its views made again by the loader) and backpropagated (Gao et al. 2021,
    arXiv 2101.06983). Costs about one extra forward per micro-batch (~1/3 more compute). Exact: the
    same loss and gradient as one micro-batch of global_batch pairs."""

    epochs: int = Field(1, ge=1)
    """Epochs to train; an epoch is `steps_per_epoch` optimizer steps."""

    steps_per_epoch: int = Field(ge=1)
    """Optimizer steps per epoch (the recipe: 275). Epochs index the data stream and the
    seeds of the views."""

    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps; the LR schedule is then this long. May change on
    resume."""

    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value (0 = off). The recipe uses 0.1."""

    precision: Literal["bf16", "fp32"] = "bf16"
    """Training precision. bf16 casts the module (DeepSpeed); the loss still runs in fp32."""

    zero_stage: int = Field(1, ge=0, le=3)
    """DeepSpeed ZeRO stage: 1 shards the optimizer state across ranks."""

    max_nonfinite_steps: int = Field(5, ge=1)
    """Stop (with a checkpoint) after this many consecutive steps with a non-finite loss. Each
    such step is skipped on every rank: no parameter update."""

    activation_checkpointing: bool = False
    """Keep only the input of the encoder's stem and of each stage for backward and run their
    forward again there (torch.utils.checkpoint, non-reentrant): about a third more compute for
    less activation memory (the full-resolution stages dominate: the recipe's estimate per GPU
    falls from 54 to 41 GiB; `ds_simclr plan` shows both). Same results."""

    channels_last: bool = False
    """Views and every activation of the encoder in channels_last_3d (NDHWC) memory format, the
    layout cuDNN's bf16 3D convolutions run natively on recent GPUs (the instance norms keep it;
    weights stay as DeepSpeed keeps them). Same results."""

    compile: bool = False
    """`torch.compile` the encoder (Inductor fuses norms and activations). The first steps compile
    (minutes for ResEnc-L on a GPU); state-dict names are unchanged. Needs Triton on a GPU, a C++
    compiler on the CPU."""

    @field_validator("micro_batch")
    @classmethod
    def _positive_micro(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive integer or 'auto'")
        return value

    @field_validator("global_batch")
    @classmethod
    def _has_negatives(cls, value: int) -> int:
        if value < 2:
            raise ValueError(
                f"global_batch {value} has no negatives: a contrastive batch needs at least 2 pairs"
                " (one pair trains with loss 0 and gradient 0)"
            )
        return value

    @model_validator(mode="after")
    def _batch_fits_some_world(self) -> TrainSpec:
        accum = self.grad_accum or 1
        per_rank = accum * (self.micro_batch if isinstance(self.micro_batch, int) else 1)
        if self.global_batch % per_rank:
            raise ValueError(
                f"global_batch {self.global_batch} is not a multiple of micro_batch x grad_accum"
                f" = {per_rank}; no world size can run it"
            )
        return self

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the run: `max_steps` when given, else epochs x steps_per_epoch."""
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch


class DistributedSpec(StrictModel):
    """How ranks are started and talk to each other."""

    launcher: Literal["torchrun", "deepspeed", "mpirun"] = "torchrun"
    """Which launcher `ds_simclr launch` starts."""

    deepspeed_backend: Literal["pdsh", "slurm", "openmpi"] = "pdsh"
    """Multi-node back-end of the DeepSpeed launcher (`--launcher`)."""

    nodes: int | Literal["auto"] = "auto"
    """Nodes to use; `auto` takes them from SLURM, the hostfile, or 1."""

    procs_per_node: int | Literal["auto"] = "auto"
    """Ranks per node; `auto` = GPUs per node (SLURM or visible GPUs), or 2 on a CPU machine."""

    hostfile: Path | None = None
    """DeepSpeed hostfile (`host slots=N` lines). Under SLURM one is written from the allocation."""

    master_port: int = Field(0, ge=0, le=65535)
    """Rendezvous port on the first node; 0 picks a free one."""

    timeout_minutes: float = Field(10.0, gt=0.0, le=24 * 60.0)
    """Collective time-out: a rank that waits longer on a collective fails the job (DeepSpeed's
    default is 30 minutes). Starting ranks wait up to 30 minutes for each other whatever it says,
    and data is made ready before the ranks start, so neither counts against it."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; `auto` = nccl with GPUs, gloo on CPU."""

    threads_per_rank: int | None = Field(None, ge=1)
    """OMP_NUM_THREADS per rank; default: cores per node / ranks per node."""

    gpu_memory_gib: float = Field(80.0, gt=0.0, le=4096.0)
    """Memory of one GPU in GiB (80: H100 or A100 80 GB; 140: H200). `ds_simclr plan` warns, with
    the fix, when its estimate of the peak memory per rank exceeds it."""

    @field_validator("nodes", "procs_per_node")
    @classmethod
    def _positive_count(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive integer or 'auto'")
        return value


class CheckpointSpec(StrictModel):
    """DeepSpeed checkpoints under `<run>/checkpoints/step_<N>`, each counted only once complete."""

    every_steps: int = Field(500, ge=1)
    """Save every this many optimizer steps (and always at the end of the run or on a stop signal)."""

    keep_last: int = Field(3, ge=1)
    """Keep this many complete checkpoints, the newest by step number (the one just written always
    among them); older ones and their universal conversions are deleted."""


class LoggingSpec(StrictModel):
    """Metrics: `metrics.jsonl` always, W&B as configured."""

    wandb_project: str = "ds_simclr"
    """W&B project."""

    wandb_entity: str | None = None
    """W&B entity (team or user); default: the API key's."""

    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """`online` needs a key and a network; `offline` writes a run to sync later; `disabled` none."""

    log_every: int = Field(10, ge=1)
    """Log metrics every this many optimizer steps."""

    image_every: int = Field(0, ge=0)
    """Log slices of one sample's two views every this many steps (0 = never)."""


class RunSpec(StrictModel):
    """A whole pretraining run."""

    name: str | None = None
    """Run name; the run directory is `<output_dir>/<name>`. Default: the spec file's stem."""

    seed: int = Field(0, ge=0)
    """Seed of everything random: data order, patches, views (per seed, epoch, sample, view)."""

    output_dir: Path = Path("runs")
    """Where run directories are created (relative to the spec file's folder)."""

    data: DataSpec
    """Training data: `demo: true` or a preprocessed store."""

    views: ViewsSpec = Field(default_factory=ViewsSpec)
    """The two augmented views per sample."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    """Encoder and projection head."""

    loss: LossSpec = Field(default_factory=LossSpec)
    """NT-Xent loss."""

    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    """AdamW and the optional LR scaling rule."""

    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    """Warm-up and cosine annealing."""

    train: TrainSpec
    """Batch arithmetic, run length, precision, ZeRO stage."""

    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """Launcher, nodes, ranks, ports, time-outs."""

    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    """How often checkpoints are written and how many are kept."""

    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    """W&B and the metrics file."""

    eval: EvalSpec = Field(default_factory=EvalSpec)
    """Online evaluation: a cheap frozen-encoder probe during pretraining."""

    _source: str = PrivateAttr(default="<spec>")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names a folder)")
        return name

    @model_validator(mode="after")
    def _views_fit(self) -> RunSpec:
        self.views.check_patch(self.data.patch_size)
        size = self.views.output_size
        try:
            check_input_shape(self.model.encoder, (size, size, size))
        except ValueError as exc:
            raise ValueError(f"views.output_size {size}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _eval_fits(self) -> RunSpec:
        size = self.eval_patch_size
        try:
            check_input_shape(self.model.encoder, (size, size, size))
        except ValueError as exc:
            raise ValueError(f"eval.patch_size {size}: {exc}") from None
        if self.eval.every_steps and self.train.zero_stage == 3:
            raise ValueError("eval.every_steps needs ZeRO stage 0-2: stage 3 partitions the weights rank 0 would probe")
        return self

    @property
    def probes_online(self) -> bool:
        """Whether the run probes at all: `eval.every_steps` is on and within the run's steps (only
        then does it need the evaluation volume)."""
        return 0 < self.eval.every_steps <= self.train.total_steps

    @property
    def eval_patch_size(self) -> int:
        """Edge of the online probe's patches: `eval.patch_size`, else `views.output_size`."""
        return self.eval.patch_size or self.views.output_size

    @property
    def source(self) -> str:
        """The spec file this spec was loaded from (for error messages)."""
        return self._source

    def where(self, field: str) -> str:
        """`file: dotted.field`, the location part of an error about this spec."""
        return f"{self._source}: {field}"

    @property
    def run_dir(self) -> Path:
        """`<output_dir>/<name>`."""
        return self.output_dir / (self.name or "run")

    @property
    def warmup_steps(self) -> int:
        """Warm-up length in optimizer steps, whichever way the spec gave it."""
        if self.schedule.warmup_steps is not None:
            return self.schedule.warmup_steps
        if self.schedule.warmup_epochs is not None:
            return round(self.schedule.warmup_epochs * self.train.steps_per_epoch)
        return 0

    @property
    def peak_lr(self) -> float:
        """`optimizer.lr` after the batch scaling rule."""
        ratio = self.train.global_batch / self.optimizer.base_batch
        factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.optimizer.lr_scaling]
        return self.optimizer.lr * factor
