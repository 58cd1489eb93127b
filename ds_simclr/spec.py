"""The run spec: one validated YAML file that every other artefact is derived from.

`load_spec` reads YAML safely, applies `--set` overrides to the raw mapping, validates everything
with the strict models below and resolves paths (``$VARS`` expand, relative paths resolve against
the spec file's folder). Errors come out as one `SpecError` line naming the file, the YAML line
where there is one, and the dotted field. Nothing heavy is imported here: `validate` and `config`
must start fast.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from ds_simclr.architectures import check_input_shape
from ds_simclr.data.options import DataSpec, ViewsSpec
from ds_simclr.errors import SpecError
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
        "data.cache_dir",
        "views.device",
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

    in_channels: int = Field(1, ge=1, le=16)
    """Input channels (MRI modalities stacked per sample). nnSSL pretrains with 1."""

    head_hidden: int = Field(2048, ge=1)
    """Width of the projection head's hidden layers (nnSSL: 2048)."""

    head_out: int = Field(2048, ge=1)
    """Dimension of the projection the loss sees (nnSSL: 2048)."""

    head_layers: int = Field(3, ge=1, le=8)
    """Linear layers in the projection head (nnSSL: 3)."""

    init_from: Path | None = None
    """Start from the weights of an export (`ds_simclr export`, or an nnSSL adaptation checkpoint)
    instead of a random initialisation: its encoder must match `encoder` and `in_channels` (a
    1-channel input projection is repeated for more channels); its projection head is taken when
    the shapes match `head_*`, else the head starts random."""


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
    Negatives per anchor are 2 x micro_batch x world size - 2; accumulation adds none."""

    micro_batch: int | Literal["auto"] = "auto"
    """Pairs per rank per micro-step, or `auto`: global_batch / (world size x grad_accum), which
    must be a whole number for the world size the job gets."""

    grad_accum: int | None = Field(None, ge=1)
    """Micro-steps per optimizer step. Default: 1 with `micro_batch: auto`, otherwise whatever
    makes the global batch come out."""

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

    @field_validator("micro_batch")
    @classmethod
    def _positive_micro(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive integer or 'auto'")
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
    default is 30 minutes)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; `auto` = nccl with GPUs, gloo on CPU."""

    threads_per_rank: int | None = Field(None, ge=1)
    """OMP_NUM_THREADS per rank; default: cores per node / ranks per node."""

    @field_validator("nodes", "procs_per_node")
    @classmethod
    def _positive_count(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive integer or 'auto'")
        return value


class CheckpointSpec(StrictModel):
    """DeepSpeed checkpoints under `<run>/checkpoints/step_<N>`."""

    every_steps: int = Field(500, ge=1)
    """Save every this many optimizer steps (and always at the end of the run)."""

    keep_last: int = Field(3, ge=1)
    """Keep this many most recent checkpoints; older ones are deleted."""


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


# --------------------------------------------------------------------------- loading


def load_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Read, override, validate and resolve a spec file. Raises `SpecError` with one line."""
    path = Path(path)
    raw, root_node = _read_yaml(path)
    for override in overrides or []:
        _apply_override(raw, override, path)
    raw.setdefault("name", path.stem)
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as exc:
        raise _spec_error(exc, path, root_node, overrides or []) from None
    spec._source = str(path)
    return resolve_paths(spec, base_dir=path.resolve().parent)


def spec_from_mapping(raw: dict[str, Any], where: str = "<spec>") -> RunSpec:
    """Validate an in-memory mapping (a saved run spec, a test) with the same one-line errors."""
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as exc:
        raise _spec_error(exc, Path(where), None, []) from None
    spec._source = where
    return spec


def dump_spec(spec: RunSpec) -> str:
    """The resolved spec as YAML (what a run directory keeps as `spec.yaml`)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def resolve_paths(model: StrictModel, base_dir: Path) -> Any:
    """Expand `$VARS` and anchor relative paths at `base_dir` in every Path field, at any depth.

    Unset variables stay as written; the data commands check paths where data is used.
    """
    for field_name in type(model).model_fields:
        value = getattr(model, field_name)
        if isinstance(value, StrictModel):
            resolve_paths(value, base_dir)
        elif isinstance(value, Path):
            expanded = Path(os.path.expanduser(os.path.expandvars(str(value))))
            if not expanded.is_absolute() and not str(expanded).startswith("$"):
                expanded = base_dir / expanded
            setattr(model, field_name, expanded)
    return model


def _read_yaml(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    if not path.is_file():
        raise SpecError("spec file not found", where=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read the spec: {exc}", where=str(path)) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = exc.problem or exc.context or "malformed YAML"
        if "could not determine a constructor" in str(exc):
            problem = "tags such as !!python/... are not allowed in a spec"
        raise SpecError(f"invalid YAML: {problem}", where=where) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"invalid YAML: {exc}", where=str(path)) from None
    if raw is None:
        raise SpecError("the spec is empty", where=str(path), hint="see ds_configs/quickstart.yaml")
    if not isinstance(raw, dict):
        raise SpecError(
            f"the spec must be a mapping of sections, not a {type(raw).__name__}", where=str(path)
        )
    return raw, node


def _apply_override(raw: dict[str, Any], override: str, path: Path) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise SpecError(f"--set expects key=value with a dotted key, got {override!r}", where=str(path))
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise SpecError(f"--set {key}: cannot parse value {text!r}", where=str(path)) from None
    target = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: {part} is not a section", where=str(path))
        target = child
    target[parts[-1]] = value


def _spec_error(exc: ValidationError, path: Path, root: yaml.Node | None, overrides: list[str]) -> SpecError:
    """Turn the first pydantic error into one line: file:line: dotted.field: message."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [str(part) for part in first["loc"] if not str(part).startswith("function-after")]
    loc = [part for part in loc if part not in ("int", "literal['auto']", "constrained-int")]
    dotted = ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown key {loc[-1]!r}" + _did_you_mean(loc)
    elif first["type"] == "missing":
        message = "required field is missing"
    overridden = any(o.partition("=")[0] == dotted for o in overrides)
    line = None if overridden else _line_of(root, loc)
    where = f"{path}:{line}" if line else str(path)
    where += f": {'--set ' if overridden else ''}{dotted}" if dotted else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return SpecError(message + more, where=where)


def _did_you_mean(loc: list[str]) -> str:
    import difflib

    model: type[StrictModel] | None = RunSpec
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, StrictModel) else None
    if model is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _line_of(node: yaml.Node | None, loc: list[str]) -> int | None:
    """1-based YAML line of the deepest node on `loc` that exists."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((kv for kv in node.value if kv[0].value == part), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line
