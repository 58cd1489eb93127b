"""What each RunSpec field changes: the registry the field walk (test_spec_fields.py) checks.

Every leaf field of `RunSpec` needs an entry in CHECKS (changing it from the base spec changes an
observable: the DeepSpeed config, the plan, the launch plan, the data stream, or a short run's
output) or in REFUSED (validate refuses values other than the supported one). A new field is one
line in CHECKS, plus an effect below when no existing one shows it; the walk fails until it has one.

A check compares the observable of the base spec with that of the base spec with one field changed
(`base` adds settings to both sides, e.g. a probability of 1 so that a range matters; `also` adds
companion settings the new value needs to be valid, e.g. `store: null` next to `demo: true`). A
variant that is refused when used (by the loader, the launcher, a rank) counts only when the check
says `refused_at_use=True`: otherwise a typo in a value would pass as an effect.

Run effects are grouped: all checks of one `group` change their fields together in ONE extra short
run, next to one base run; all runs share one rank process (four short runs cover every run-only
field). Comparing with the base is sound only if a check's observable would come out as in the base
run were its own field ignored, i.e. the other changes of its group cannot move it: each observable
below says what it depends on; put a new field in a group where that holds, or in a new group (one
more run). A process starts one process group, so group `a` runs first and its time-out is the one
observed (by `expect`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ds_simclr.errors import UserError
from ds_simclr.spec import RunSpec
from ds_simclr.specload import spec_from_mapping

GPU = torch.cuda.is_available()


@dataclass(frozen=True)
class Asset:
    """A path made by the test session (stores, manifests, caches, hostfiles), filled in by `Context`."""

    name: str


@dataclass(frozen=True)
class Effect:
    """An observable computed from a spec without a run; equal specs must give equal observations."""

    name: str
    observe: Callable[[RunSpec, Context], Any]


@dataclass(frozen=True)
class RunEffect:
    """An observable read from the outcome of a short training run (see `_one_run`).

    Without `expect` a check passes when the variant's observation differs from the base run's; with
    it, when the variant's observation is `expect(value)`: the run shows the value it was given
    (for what the base run cannot show, e.g. a W&B project with W&B off)."""

    name: str
    read: Callable[[dict[str, Any]], Any]
    expect: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Check:
    """Changing `field` to `value` changes what `effect` observes."""

    field: str
    value: Any
    effect: Effect | RunEffect
    base: dict[str, Any] = field(default_factory=dict)
    also: dict[str, Any] = field(default_factory=dict)
    group: str = "a"
    refused_at_use: bool = False


# --------------------------------------------------------------------------- the base spec and assets


BASE: dict[str, Any] = {
    "name": "walk",
    "seed": 3,
    "output_dir": Asset("runs"),
    "data": {"store": Asset("store_both"), "cache_dir": Asset("cache"), "patch_size": 24, "num_workers": 1, "prefetch": 1},
    "views": {"output_size": 16, "crop_min": 12},
    "model": {"encoder": "resenc_tiny", "head_hidden": 32, "head_out": 16, "head_layers": 2},
    "optimizer": {"lr": 0.01},
    "schedule": {"warmup_steps": 1, "min_lr_ratio": 0.1},
    "train": {"global_batch": 2, "steps_per_epoch": 2, "epochs": 2, "precision": "fp32"},
    "distributed": {"master_port": 29555},  # fixed: 0 would pick a new free port per launch plan
    "checkpoint": {"every_steps": 1, "keep_last": 3},
    "logging": {"wandb_mode": "disabled", "log_every": 1},
}
"""Small enough for a 4-step CPU run (2 pairs of 16^3 views per step), on a real 2-volume store."""


class Context:
    """The session's assets and the base spec; builds variant specs."""

    def __init__(self, assets: dict[str, Path], demo_cache: Callable[[], Path]) -> None:
        self.assets = assets
        self._demo_cache = demo_cache

    def fill(self, value: Any) -> Any:
        if isinstance(value, Asset):
            return str(self._demo_cache() if value.name == "demo_cache" else self.assets[value.name])
        if isinstance(value, dict):
            return {key: self.fill(item) for key, item in value.items()}
        return value

    def mapping(self, changes: dict[str, Any]) -> dict[str, Any]:
        """BASE with dotted `changes` applied (a value None removes the key)."""
        raw = copy.deepcopy(BASE)
        for dotted, value in changes.items():
            *parents, leaf = dotted.split(".")
            target = raw
            for part in parents:
                target = target.setdefault(part, {})
            if value is None:
                target.pop(leaf, None)
            else:
                target[leaf] = value
        return self.fill(raw)

    def spec(self, changes: dict[str, Any]) -> RunSpec:
        return spec_from_mapping(self.mapping(changes))


@dataclass(frozen=True)
class Refused:
    """What an effect observes when using the spec is refused (a UserError's line)."""

    message: str


def observe(effect: Effect, spec: RunSpec, ctx: Context) -> Any:
    """The effect's observation, or `Refused` when using the spec is refused."""
    try:
        return effect.observe(spec, ctx)
    except UserError as exc:
        return Refused(exc.one_line())


# --------------------------------------------------------------------------- effects without a run


def _config(spec: RunSpec, ctx: Context) -> Any:
    from ds_simclr.dsconfig import deepspeed_config

    return deepspeed_config(spec, 1)


def _plan(spec: RunSpec, ctx: Context) -> Any:
    from ds_simclr.planning import plan_report

    return plan_report(spec, 1).text


def _launch(spec: RunSpec, ctx: Context) -> Any:
    from ds_simclr.launch import describe, make_plan

    return describe(*make_plan(spec, env={}))


def _loader(spec: RunSpec):
    from ds_simclr.data.loader import PairLoader
    from ds_simclr.data.source import resolve_store
    from ds_simclr.dsconfig import plan_batch

    batch = plan_batch(spec, 1)
    return PairLoader(
        resolve_store(spec.data), spec.data, spec.views, seed=spec.seed, global_batch=spec.train.global_batch,
        micro_batch=batch.micro_batch, grad_accum=batch.grad_accum, steps_per_epoch=spec.train.steps_per_epoch,
        rank=0, world_size=1, device=torch.device("cuda" if GPU else "cpu"),
    )


def _data_stream(spec: RunSpec, ctx: Context) -> Any:
    """The first micro-batch's samples and both views, as digests."""
    loader = _loader(spec)
    try:
        first = next(loader.iterate(0))
    finally:
        loader.close()
    digest = [hashlib.sha256(v.cpu().numpy().tobytes()).hexdigest() for v in (first.view1, first.view2)]
    return first.slots, tuple(first.view1.shape), digest


@contextmanager
def _patch_reads() -> Iterator[list[str]]:
    """Record the thread of every patch read (a spy around the real PatchStore.read_patch)."""
    from ds_simclr.data.store import PatchStore

    real, threads = PatchStore.read_patch, []

    def read_patch(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    PatchStore.read_patch = read_patch
    try:
        yield threads
    finally:
        PatchStore.read_patch = real


def _reader_threads(spec: RunSpec, ctx: Context) -> Any:
    """Which kind of thread reads patches: the producer itself or reader threads."""
    with _patch_reads() as threads:
        loader = _loader(spec)
        try:
            next(loader.iterate(0))
        finally:
            loader.close()
    return sorted({name.split("_")[0] for name in threads})


def _reads_ahead(spec: RunSpec, ctx: Context) -> Any:
    """Patches read once the producer has run as far ahead of a consumer that took one batch as it may."""
    with _patch_reads() as threads:
        loader = _loader(spec)
        try:
            next(loader.iterate(0))
            seen, stable_since, deadline = -1, time.monotonic(), time.monotonic() + 30
            while time.monotonic() - stable_since < 0.5 and time.monotonic() < deadline:
                if len(threads) != seen:
                    seen, stable_since = len(threads), time.monotonic()
                time.sleep(0.02)
        finally:
            loader.close()
    return seen


def _open_volumes(spec: RunSpec, ctx: Context) -> Any:
    """Volumes the patch store keeps mapped after the first micro-batch (its LRU's bound at work)."""
    loader = _loader(spec)
    try:
        next(loader.iterate(0))
        return loader.store.open_volumes
    finally:
        loader.close()


def _store_folder(spec: RunSpec, ctx: Context) -> Any:
    """The store `launch` makes ready (preprocessing the manifest when needed) and the ranks open."""
    from ds_simclr.data.source import prepare_store, resolve_store

    prepare_store(spec.data, jobs=1, nodes=1, echo=lambda line: None)
    return str(resolve_store(spec.data))


def _training_model(spec: RunSpec, ctx: Context) -> Any:
    """The model a run trains (`engine.training_model`): compiled or not; without compiling, the
    tensors one forward saves for backward and their memory formats."""
    from ds_simclr.engine import training_model

    model, _ = training_model(spec)
    compiled = model.encoder._compiled_call_impl is not None
    if compiled:  # a forward would compile (slow); that it is compiled is the effect
        return compiled, None
    saved: list[str] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 5:
            saved.append("channels_last" if tensor.is_contiguous(memory_format=torch.channels_last_3d) else "default")
        return tensor

    size = spec.views.output_size
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.randn(2, spec.model.in_channels, size, size, size))
    return compiled, sorted(saved)


def _initial_weights(spec: RunSpec, ctx: Context) -> Any:
    """A digest of the weights a fresh run starts from (`engine.training_model`)."""
    from ds_simclr.engine import training_model

    model, _ = training_model(spec)
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode() + value.detach().numpy().tobytes())
    return digest.hexdigest()


def _probe_patches(spec: RunSpec, ctx: Context) -> Any:
    """The online probe's train and test patches (shapes and a digest), on the evaluation volume
    that `launch` prepares before the ranks start."""
    from ds_simclr.evaluation.atlas import ensure_eval_set
    from ds_simclr.evaluation.online import OnlineProbe

    ensure_eval_set(spec.data.cache_dir)
    probe = OnlineProbe(spec, torch.device("cpu"))
    digest = hashlib.sha256(probe.train.tobytes() + probe.test.tobytes()).hexdigest()
    return probe.train.shape, probe.test.shape, digest


CONFIG = Effect("DeepSpeed config", _config)
PLAN = Effect("plan", _plan)
LAUNCH = Effect("launch plan (--dry-run)", _launch)
DATA = Effect("data stream: first micro-batch", _data_stream)
READERS = Effect("threads that read patches", _reader_threads)
READ_AHEAD = Effect("patches read ahead", _reads_ahead)
OPEN_VOLUMES = Effect("volumes kept mapped after the first micro-batch", _open_volumes)
STORE = Effect("store folder trained from", _store_folder)
MODEL = Effect("model as trained: compiled, 5-D tensors saved for backward and their layout", _training_model)
WEIGHTS = Effect("initial weights", _initial_weights)
PROBE_PATCHES = Effect("online probe's patches", _probe_patches)


# --------------------------------------------------------------------------- effects of a short run
# Each reads one thing from the outcome `_one_run` returns; it depends only on what its comment says.

LOSS = RunEffect("loss of step 2", lambda o: next((r["loss"] for r in o.get("rows", []) if r["step"] == 2), None))
"""Depends on the model, data, optimizer and loss; logging, checkpoints and W&B do not touch it."""
LOGGED = RunEffect("steps in metrics.jsonl", lambda o: [r["step"] for r in o.get("rows", [])])
"""Depends on log_every, image_every (image steps are logged), skipped steps and the end; with
log_every 1 (the base) image_every cannot move it."""
CHECKPOINTS = RunEffect("checkpoint tags kept", lambda o: o.get("tags"))
"""Depends on every_steps and keep_last (and the run's length)."""
IMAGES = RunEffect("steps with view images in W&B", lambda o: o.get("image_steps"))
"""Depends on image_every and on W&B being on (the base has it off, so image_every's group turns it on)."""
WANDB_RUN = RunEffect("W&B run written", lambda o: o.get("wandb") is not None)
"""Depends on wandb_mode."""
WANDB_PROJECT = RunEffect("W&B project", lambda o: (o.get("wandb") or {}).get("project"), expect=lambda value: value)
"""The project of the run's W&B record."""
WANDB_ENTITY = RunEffect("W&B entity", lambda o: (o.get("wandb") or {}).get("entity"), expect=lambda value: value)
"""The entity of the run's W&B record."""
STOP = RunEffect("how the run ended", lambda o: o.get("error"))
"""A non-finite step is injected at the last step of every run: only max_nonfinite_steps decides."""
TIMEOUT = RunEffect("collective time-out (s)", lambda o: o.get("timeout_s"), expect=lambda minutes: minutes * 60)
"""The time-out of the process group the rank started (group `a` starts it)."""
START = RunEffect("rank start", lambda o: o.get("refused"))
"""Whether the rank refused to start (one line) or started."""
PROBED = RunEffect(
    "steps with an online probe in metrics.jsonl",
    lambda o: o.get("probed"),
    expect=lambda every: list(range(every, BASE["train"]["epochs"] * BASE["train"]["steps_per_epoch"] + 1, every)),
)
"""The steps whose row has the probe's scores; the probe forces a row, so it moves the logged steps
(a group of its own)."""


def _last_step_nan(trainer: Any) -> None:
    """Fault injection: a NaN in the first view of the last step's batch."""
    real_iterate, last = trainer.loader.iterate, trainer.spec.train.total_steps - 1

    def poisoned(start: int):
        for pair in real_iterate(start):
            if pair.step == last:
                pair.view1[0].fill_(float("nan"))
            yield pair

    trainer.loader.iterate = poisoned


def _wandb_records(run_dir: Path) -> dict[str, Any]:
    """The run record and the steps with images, read from the offline W&B run (`wandb leet inspect`)."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    if not runs:
        return {"wandb": None, "image_steps": []}
    exe = str(Path(sys.executable).with_name("wandb"))
    text = subprocess.run([exe, "leet", "inspect", "--json", str(runs[-1])], capture_output=True, text=True, check=True).stdout
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    run = next(r["run"] for r in records if r["type"] == "run")
    images = [r["history"]["item"]["step"] for r in records if r["type"] == "history" and "views._type" in r["history"]["item"]]
    return {"wandb": {"project": run["project"], "entity": run.get("entity")}, "image_steps": images}


def _one_run(mapping: dict[str, Any]) -> dict[str, Any]:
    """Train `mapping` on this rank (a world of one); what the run left behind."""
    import torch.distributed as dist

    from ds_simclr.checkpoint import step_tags
    from ds_simclr.engine import Trainer
    from ds_simclr.errors import TrainingError
    from ds_simclr.rundir import RunPaths
    from ds_simclr.telemetry import read_metrics

    spec = spec_from_mapping(mapping)
    if spec.probes_online:  # as `launch` does before the ranks start
        from ds_simclr.evaluation.atlas import ensure_eval_set

        ensure_eval_set(spec.data.cache_dir)
    try:
        trainer = Trainer(spec)
    except UserError as exc:
        return {"refused": exc.one_line()}
    options = dist.group.WORLD._get_backend(torch.device("cpu")).options  # gloo's options hold the time-out
    outcome: dict[str, Any] = {"refused": None, "timeout_s": options._timeout.total_seconds()}
    _last_step_nan(trainer)
    try:
        trainer.run()
    except TrainingError as exc:
        outcome["error"] = exc.one_line()
    paths = RunPaths(spec.run_dir)
    rows = read_metrics(paths.metrics)
    outcome["rows"] = [{"step": r["step"], "loss": r["loss"]} for r in rows]
    outcome["probed"] = [r["step"] for r in rows if "probe_logreg_mirrored" in r and "probe_knn_mirrored" in r]
    outcome["tags"] = step_tags(paths.checkpoints)
    return {**outcome, **_wandb_records(paths.root)}


def run_all(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Runs one after the other in this process (spawned by the test as a rank), in the given order.
    The first run that starts sets the process group for all of them (DeepSpeed keeps its groups)."""
    return {key: _one_run(mapping) for key, mapping in runs.items()}


# --------------------------------------------------------------------------- the registry

VIEW_DEVICE = "cpu" if GPU else "cuda"
"""A views.device that differs from `auto` here: `cuda` is refused on a CPU-only machine."""

TWO_HOSTS = {"distributed.launcher": "deepspeed", "distributed.hostfile": Asset("hostfile"), "train.global_batch": 4}
"""The DeepSpeed launcher on a hostfile of two (remote) hosts x 2 slots."""

CHECKS: list[Check] = [
    Check("name", "other", LAUNCH),
    Check("seed", 4, DATA),
    Check("output_dir", Asset("elsewhere"), LAUNCH),
    # data
    Check("data.demo", True, DATA, also={"data.store": None, "data.cache_dir": Asset("demo_cache")}),
    Check("data.manifest", Asset("manifest_t1"), DATA, base={"data.store": None, "data.manifest": Asset("manifest_both")}),
    Check("data.store", Asset("store_t1"), DATA),
    Check("data.modalities", ["T1w"], DATA),
    Check("data.cache_dir", Asset("cache2"), STORE, base={"data.store": None, "data.manifest": Asset("manifest_t1")}),
    Check("data.patch_size", 32, DATA),
    Check("data.num_workers", 0, READERS),
    Check("data.prefetch", 3, READ_AHEAD, base={"data.num_workers": 0}),
    Check("data.max_open_files", 2, OPEN_VOLUMES),
    # views
    Check("views.output_size", 32, DATA),
    Check("views.crop_min", 20, DATA),
    Check("views.flip_prob", 0.0, DATA),
    Check("views.flip_all_axes", True, DATA, base={"views.flip_prob": 1.0}),
    Check("views.rotate_prob", 0.0, DATA),
    Check("views.rotate_range_deg", [10.0, 20.0, 0.0], DATA, base={"views.rotate_prob": 1.0}),
    Check("views.shift_prob", 0.0, DATA),
    Check("views.shift_range", 2.0, DATA, base={"views.shift_prob": 1.0}),
    Check("views.contrast_prob", 0.0, DATA),
    Check("views.contrast_gamma", [0.9, 1.1], DATA, base={"views.contrast_prob": 1.0}),
    Check("views.bias_field_prob", 1.0, DATA),
    Check("views.bias_field_coeff", [0.2, 0.5], DATA, base={"views.bias_field_prob": 1.0}),
    Check("views.bias_field_order", 1, DATA, base={"views.bias_field_prob": 1.0}),
    Check("views.noise_prob", 1.0, DATA),
    Check("views.noise_std", [0.5, 1.0], DATA, base={"views.noise_prob": 1.0}),
    Check("views.blur_prob", 1.0, DATA),
    Check("views.blur_sigma", [1.5, 2.0], DATA, base={"views.blur_prob": 1.0}),
    Check("views.gamma_prob", 1.0, DATA),
    Check("views.gamma_range", [0.5, 0.6], DATA, base={"views.gamma_prob": 1.0}),
    Check("views.device", VIEW_DEVICE, DATA, refused_at_use=not GPU),
    # model and loss
    Check("model.encoder", "resenc_s", PLAN, base={"views.output_size": 64, "data.patch_size": 64}),
    Check("model.head_hidden", 64, PLAN),
    Check("model.head_out", 8, PLAN),
    Check("model.head_layers", 3, PLAN),
    Check("model.init_from", Asset("export"), WEIGHTS),
    Check("loss.temperature", 0.2, LOSS),
    # optimizer and schedule
    Check("optimizer.lr", 0.02, CONFIG),
    Check("optimizer.betas", [0.8, 0.99], CONFIG),
    Check("optimizer.eps", 1e-6, CONFIG),
    Check("optimizer.weight_decay", 0.1, CONFIG),
    Check("optimizer.lr_scaling", "linear", CONFIG),
    Check("optimizer.base_batch", 4, CONFIG, base={"optimizer.lr_scaling": "linear"}),
    Check("schedule.warmup_steps", 3, CONFIG),
    Check("schedule.warmup_epochs", 1.0, CONFIG, base={"schedule.warmup_steps": None}),
    Check("schedule.warmup_start_ratio", 0.5, CONFIG),
    Check("schedule.min_lr_ratio", 0.3, CONFIG),
    # train
    Check("train.global_batch", 4, CONFIG),
    # 2 pairs per step: 1 x 2 micro-batches would contrast 1 pair (refused), so these split 4 pairs.
    Check("train.micro_batch", 2, CONFIG, base={"train.global_batch": 4}),
    Check("train.grad_accum", 2, CONFIG, base={"train.global_batch": 4}),
    Check("train.gradient_cache", True, PLAN, base={"train.global_batch": 4, "train.grad_accum": 2}),
    Check("train.epochs", 3, CONFIG),
    Check("train.steps_per_epoch", 3, CONFIG),
    Check("train.max_steps", 3, CONFIG),
    Check("train.grad_clip", 0.5, CONFIG),
    Check("train.precision", "bf16", CONFIG),
    Check("train.zero_stage", 2, CONFIG),
    Check("train.max_nonfinite_steps", 1, STOP),
    Check("train.activation_checkpointing", True, MODEL),
    Check("train.channels_last", True, MODEL),
    Check("train.compile", True, MODEL),
    # distributed
    Check("distributed.launcher", "deepspeed", LAUNCH),
    Check("distributed.deepspeed_backend", "slurm", LAUNCH, base=TWO_HOSTS),
    Check("distributed.nodes", 1, LAUNCH, base=TWO_HOSTS),
    Check("distributed.procs_per_node", 3, LAUNCH, base={"train.global_batch": 6}),
    Check("distributed.hostfile", Asset("hostfile"), LAUNCH, base={"distributed.launcher": "deepspeed", "train.global_batch": 4}),
    Check("distributed.master_port", 29556, LAUNCH),
    Check("distributed.threads_per_rank", 13, LAUNCH),
    Check("distributed.timeout_minutes", 2.5, TIMEOUT),
    Check("distributed.gpu_memory_gib", 0.001, PLAN),
    Check("distributed.backend", "nccl", START, group="c", refused_at_use=True),
    # checkpoints and logging
    Check("checkpoint.every_steps", 2, CHECKPOINTS),
    Check("checkpoint.keep_last", 1, CHECKPOINTS, group="b"),
    Check("logging.wandb_project", "walk-project", WANDB_PROJECT),
    Check("logging.wandb_entity", "walk-entity", WANDB_ENTITY),
    Check("logging.wandb_mode", "offline", WANDB_RUN),
    Check("logging.log_every", 2, LOGGED),
    Check("logging.image_every", 3, IMAGES),
    # online evaluation
    Check("eval.every_steps", 2, PROBED, group="e"),
    Check("eval.patches_per_class", 3, PROBE_PATCHES),
    Check("eval.patch_size", 32, PROBE_PATCHES),
]

REFUSED: dict[str, Any] = {
    "model.in_channels": 2,
}
"""Fields whose other values `validate` refuses (exit 2, one line saying what is supported)."""
