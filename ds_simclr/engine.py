"""The training loop: DeepSpeed engine, views -> encoder -> head -> NT-Xent -> step, checkpoints.

Every rank runs the same steps. Once per optimizer step, before its last backward, one small
all-reduce agrees on the loss (finite or not) and on a stop request, so a bad step is skipped
everywhere (no update; the LR schedule still
advances so it stays equal to the plan). Checkpoints are DeepSpeed's own (`step_<N>` tags) with a
client state holding our step counters; one counts only once complete (`checkpoint.py`). Before
anything is written rank 0 takes the run directory's lock, checks the spec and the checkpoints,
picks the newest complete one and, on another world size, converts it to a universal checkpoint
(`runstart.py`). A stop request (SIGTERM, SIGUSR1) is agreed on at a step boundary, then the run
checkpoints and exits cleanly so a relaunch resumes.

With `train.gradient_cache` (and grad_accum > 1) a step is one NT-Xent over all its pairs, checked
for finiteness once (`ds_simclr.gradcache`); skipping, clipping and metrics are as above.

Reading that agreement is a step's one host sync: the gradient norm and the contrastive metrics
(more collectives) are read on logged steps only.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_simclr import dist
from ds_simclr.atomic import write_atomic
from ds_simclr.checkpoint import commit, find_resume_point, prune, staging_folder, tag_for, write_latest, write_marker
from ds_simclr.dsconfig import BatchPlan, deepspeed_config, plan_batch
from ds_simclr.environment import software
from ds_simclr.errors import CheckpointError, FollowOnError, TrainingError, UserError, storage_error
from ds_simclr.gradcache import gradient_cache_step
from ds_simclr.lifeline import tie_to_launcher
from ds_simclr.loss import contrastive_metrics, nt_xent_local
from ds_simclr.rundir import RunPaths, check_resumable, write_run_files
from ds_simclr.runlock import RunLock, hold_run_dir
from ds_simclr.runstart import Start, check_run_dir, plan_start
from ds_simclr.runtime import Placement, init_distributed
from ds_simclr.schedule import prime
from ds_simclr.spec import RunSpec

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class TrainState:
    """Counters that a checkpoint carries (DeepSpeed keeps model, optimizer and scheduler)."""

    step: int = 0
    """Optimizer steps completed (also the data position: the loader is a function of it)."""
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0

    def client_state(self) -> dict[str, Any]:
        return {
            "ds_simclr": {
                "step": self.step,
                "skipped_steps": self.skipped_steps,
                "consecutive_nonfinite": self.consecutive_nonfinite,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
            }
        }

    @classmethod
    def from_client_state(cls, client: dict[str, Any]) -> TrainState:
        ours = client["ds_simclr"]
        torch.set_rng_state(ours["rng"]["torch"])
        np.random.set_state(ours["rng"]["numpy"])
        random.setstate(ours["rng"]["python"])
        return cls(ours["step"], ours["skipped_steps"], ours["consecutive_nonfinite"])


@dataclass
class TrainResult:
    """How a `train` call ended."""

    run_dir: Path
    steps_done: int
    stopped_early: bool
    skipped_steps: int
    losses: list[float] = field(default_factory=list)


@dataclass
class StepOutcome:
    """What one optimizer step left for the loop."""

    row: dict[str, Any]
    """The cheap part of its metrics row: loss (read with the agreement), lr, skipped, times."""
    stopping: bool
    """A stop was requested on some rank (agreed with the loss: the same on every rank)."""
    embeddings: tuple[torch.Tensor, torch.Tensor] | None
    """(n, D) each, for the contrastive metrics of a logged step; None when skipped."""


class StopRequest:
    """Remembers a SIGTERM/SIGUSR1 so the loop can checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _environment(place: Placement) -> dict[str, Any]:
    """Software plus the host of every rank (a collective: every rank calls it)."""
    hosts: list[str | None] = [None] * place.world_size
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    return {
        **software(),
        "cuda": torch.version.cuda,
        "world_size": place.world_size,
        "hosts": sorted(set(hosts)),
        "rank_hosts": hosts,
    }


def quiet_deepspeed() -> None:
    """Keep DeepSpeed's info chatter and known harmless warnings out of the user's terminal."""
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.* is deprecated")


def _write_failure(exc: BaseException, doing: str, folder: Path) -> UserError | None:
    """A one-line StorageError when a failed write was a full disk or an unwritable folder.

    torch.save reports a full disk as a RuntimeError without errno ("file write failed"); a small
    probe write into the same folder then tells what the file system says.
    """
    found = storage_error(exc, doing, str(folder))
    if found is not None or not isinstance(exc, RuntimeError):
        return found
    try:
        write_atomic(folder / f".probe{os.getpid()}", b"\0" * 65536)
        (folder / f".probe{os.getpid()}").unlink()
    except OSError as probe:
        return storage_error(probe, doing, str(folder))
    return None


def training_model(spec: RunSpec, warm: bool = True) -> tuple[torch.nn.Module, str]:
    """The model a run trains: the spec's encoder and head seeded with `spec.seed`, started from
    `model.init_from` when `warm` (a fresh run), with its speed options switched on; and where its
    weights come from, in words (see `warmstart.initial_model`)."""
    from ds_simclr.model import configure_speed
    from ds_simclr.warmstart import initial_model

    model, origin = initial_model(spec, warm=warm)
    speed = spec.train.model_dump(include={"activation_checkpointing", "channels_last", "compile"})
    return configure_speed(model, **speed), origin


class Trainer:
    """One rank's part of a run; `run()` trains from the current state to the end (or a stop)."""

    def __init__(self, spec: RunSpec, run_dir: Path | None = None, stop: StopRequest | None = None) -> None:
        import deepspeed

        from ds_simclr.data.loader import PairLoader
        from ds_simclr.data.source import resolve_store

        self.spec = spec
        self.stop = stop
        store = resolve_store(spec.data, spec.where("data"))  # made complete by `launch`; never built here
        self.place = init_distributed(spec.distributed.backend, spec.distributed.timeout_minutes)
        self.batch: BatchPlan = plan_batch(spec, self.place.world_size)
        self.ds_config = deepspeed_config(spec, self.place.world_size)
        self.paths = RunPaths(Path(run_dir) if run_dir else spec.run_dir)
        self.rank_zero = self.place.rank == 0
        self.lock: RunLock | None = None

        check_resumable(self.paths, spec)  # every rank checks, so every rank fails alike
        failure: UserError | None = None
        start: Start | None = None
        if self.rank_zero:
            try:
                self.lock = hold_run_dir(self.paths.lock)
                point = check_run_dir(self.paths, spec, store)  # every check before anything is written
                start = plan_start(self.paths, point, store, self.place.world_size)
                write_run_files(self.paths, spec, self.ds_config)
            except UserError as exc:
                failure = exc
            except OSError as exc:
                failure = storage_error(exc, "preparing the run directory")
                if failure is None:
                    raise
        if not dist.all_ranks_true(failure is None):  # also the barrier: the others wait for the checks
            if self.lock is not None:
                self.lock.release()
            raise failure or FollowOnError("rank 0 could not prepare the run directory (its error says why)")
        start = _broadcast(start)
        self.store_identity = start.store_identity
        environment = _environment(self.place)
        if self.rank_zero:  # keep what `launch` recorded (launcher, command, SLURM job), add the ranks' view
            path = self.paths.environment
            recorded = json.loads(path.read_text()) if path.is_file() else {}
            environment.update(store=str(store), store_identity=start.store_identity)
            write_atomic(path, json.dumps({**recorded, **environment}, indent=2) + "\n")

        fresh = start.load_tag is None  # a resumed run loads its checkpoint instead
        model, origin = training_model(spec, warm=fresh)
        if self.rank_zero and fresh and spec.model.init_from is not None:
            print(f"init_from: starting from the {origin}", flush=True)
        self.probe = None
        if spec.probes_online:
            from ds_simclr.evaluation.online import OnlineProbe

            self.probe = _on_rank_zero(lambda: OnlineProbe(spec, self.place.device), "load the evaluation volume")
        quiet_deepspeed()
        # DeepSpeed reads a universal checkpoint only when told so at initialize (this start only).
        config = {**self.ds_config, "checkpoint": {"load_universal": True}} if start.universal else self.ds_config
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        self.dtype = torch.bfloat16 if spec.train.precision == "bf16" else torch.float32
        self.sample_views: tuple[torch.Tensor, torch.Tensor] | None = None

        self.state = TrainState()
        self.start = start
        if start.load_tag is not None:
            self.state = self._load(start)
        else:
            prime(self.scheduler)
        self.loader = PairLoader(
            store,
            spec.data,
            spec.views,
            seed=spec.seed,
            global_batch=spec.train.global_batch,
            micro_batch=self.batch.micro_batch,
            grad_accum=self.batch.grad_accum,
            steps_per_epoch=spec.train.steps_per_epoch,
            rank=self.place.rank,
            world_size=self.place.world_size,
            device=self.place.device,
        )

    # ------------------------------------------------------------------ checkpoints

    def _load(self, start: Start) -> TrainState:
        """Load the chosen checkpoint (universal when saved on another world size)."""
        where = str(self.paths.checkpoints / start.load_tag)
        try:
            _, client = self.engine.load_checkpoint(str(self.paths.checkpoints), tag=start.load_tag)
        except Exception as exc:
            raise CheckpointError(
                f"DeepSpeed cannot load it: {' '.join(str(exc).split())[:300]}",
                where=where,
                hint="move it aside to resume from the checkpoint before it",
            ) from exc
        if client is None or "ds_simclr" not in client:
            raise CheckpointError("DeepSpeed found no checkpoint to load there", where=where)
        state = TrainState.from_client_state(client)
        if state.step != start.step:
            raise CheckpointError(f"holds step {state.step}, its marker says {start.step}", where=where)
        return state

    def save_checkpoint(self) -> str:
        """Write `step_<N>`: every rank into staging, then rank 0 marks it complete, moves it into
        place, points `latest` at it and prunes (see `checkpoint.py`)."""
        paths, step = self.paths, self.state.step
        tag, staging = tag_for(step), staging_folder(paths.checkpoints)
        if self.rank_zero:
            shutil.rmtree(staging / tag, ignore_errors=True)  # debris of a killed writer
        torch.distributed.barrier()
        try:
            self.engine.save_checkpoint(str(staging), tag=tag, client_state=self.state.client_state(), save_latest=False)
            if self.rank_zero:  # save_checkpoint returned on every rank: every rank's files are written
                partitioned = bool(self.engine.zero_optimization() or self.engine.bfloat16_enabled())
                write_marker(staging / tag, step, self.place.world_size, partitioned, self.store_identity)
                commit(staging / tag, paths.checkpoints)
                write_latest(paths.checkpoints, tag)
                prune(paths.checkpoints, self.spec.checkpoint.keep_last, tag)
        except Exception as exc:
            failure = _write_failure(exc, f"writing checkpoint {tag}", paths.checkpoints)
            if failure is None:
                raise
            try:
                newest = find_resume_point(paths.checkpoints, deep=False)
            except CheckpointError:
                newest = None
            failure.message += f"; {newest.tag if newest else 'no checkpoint'} is the newest complete checkpoint"
            raise failure from exc
        torch.distributed.barrier()
        return tag

    # ------------------------------------------------------------------ one optimizer step

    def _optimizer_step(self, batches: Any, stop_requested: bool = False) -> StepOutcome:
        """Run the micro-batches of one optimizer step; agree on its loss and on `stop_requested`.

        One small all-reduce and one host sync per step: the loss stays on the device until the
        agreement reads its global sum (`dist.sum_and_any`). What costs more syncs or collectives
        (gradient norm, contrastive metrics) is left to `_monitoring`, on logged steps.
        """
        spec, engine = self.spec, self.engine
        lr = float(engine.get_lr()[0])
        times = {"time_data_s": 0.0, "time_fwd_bwd_s": 0.0, "time_optimizer_s": 0.0}
        micro_views = self._micro_views(batches, times)
        if self.batch.uses_gradient_cache:
            t0 = time.perf_counter()
            again = functools.partial(self._views_again, times=times)
            cached = gradient_cache_step(engine, micro_views, again, spec.loss.temperature, stop_requested)
            times["time_optimizer_s"] = cached.optimizer_s
            times["time_fwd_bwd_s"] = time.perf_counter() - t0 - times["time_data_s"] - cached.optimizer_s
            loss, stepped, stopping, embeddings = cached.loss, cached.stepped, cached.stopping, (cached.z1, cached.z2)
        else:
            loss, stepped, stopping, embeddings = self._plain_micro_steps(micro_views, stop_requested, times)
        finite = math.isfinite(loss)
        if finite and not engine.was_step_applied():
            finite = False  # the loss was finite, the gradients were not: DeepSpeed refused the update
        if not finite:
            self._skip_step(stepped)
        row: dict[str, Any] = {
            "loss": loss if math.isfinite(loss) else float("nan"),
            "lr": lr,
            "skipped": not finite,
            **times,
        }
        return StepOutcome(row, stopping, embeddings if finite else None)

    def _monitoring(self, outcome: StepOutcome) -> dict[str, Any]:
        """The step's gradient norm and contrastive metrics: host syncs and collectives, so read on
        logged steps only, by every rank (the metrics are collectives)."""
        if outcome.row["skipped"]:
            return {}
        numbers: dict[str, Any] = {"grad_norm": _as_float(self.engine.get_global_grad_norm())}
        if outcome.embeddings is not None:
            numbers.update(contrastive_metrics(*outcome.embeddings, self.spec.loss.temperature))
        return numbers

    def _micro_views(self, batches: Any, times: dict[str, float]) -> Iterator[torch.Tensor]:
        """This step's micro-batches as (2n, 1, S, S, S) views in the training dtype (first views first)."""
        for micro in range(self.batch.grad_accum):
            batch = next(batches)
            if (batch.step, batch.micro) != (self.state.step, micro):
                raise RuntimeError(f"loader out of step: got {(batch.step, batch.micro)}, expected {(self.state.step, micro)}")
            times["time_data_s"] += batch.data_wait_s
            self.sample_views = (batch.view1[0], batch.view2[0])  # for the occasional image
            yield torch.cat([batch.view1, batch.view2]).to(self.dtype)  # (2n, 1, S, S, S)

    def _views_again(self, micro: int, times: dict[str, float]) -> torch.Tensor:
        """Micro-batch `micro` of this step made again by the loader (bit-identical), for a second forward."""
        t0 = time.perf_counter()
        batch = self.loader.make(self.state.step, micro)
        views = torch.cat([batch.view1, batch.view2]).to(self.dtype)  # (2n, 1, S, S, S)
        times["time_data_s"] += time.perf_counter() - t0
        return views

    def _plain_micro_steps(
        self, micro_views: Iterator[torch.Tensor], stop_requested: bool, times: dict[str, float]
    ) -> tuple[float, bool, bool, tuple[torch.Tensor, torch.Tensor] | None]:
        """NT-Xent per micro-batch (negatives: micro x world); returns the step's loss (the mean over
        its micro-batches, non-finite if any was), stepped, the agreed stop and the last embeddings.

        The ranks agree once, after the last forward and before its backward: with grad_accum 1 a
        non-finite loss skips backward and the optimizer on every rank; with accumulation the
        earlier micro-batches are already in DeepSpeed's buffers, which then voids the step.
        """
        engine, accum = self.engine, self.batch.grad_accum
        ce_total = torch.zeros((), device=self.place.device)  # () sum of the local cross-entropies
        loss, stepped, stopping = float("nan"), False, False
        z_last: tuple[torch.Tensor, torch.Tensor] | None = None
        for micro, views in enumerate(micro_views):
            t0 = time.perf_counter()
            z1, z2 = engine(views).chunk(2)  # (n, D) each
            loss_local, ce_sum, two_big_n = nt_xent_local(z1, z2, self.spec.loss.temperature)
            ce_total += ce_sum.detach()
            if micro == accum - 1:  # the step's one collective of its own and its one host sync
                total, stopping = dist.sum_and_any(ce_total, stop_requested)
                loss = total / (two_big_n * accum)
                if not math.isfinite(loss) and accum == 1:
                    times["time_fwd_bwd_s"] += time.perf_counter() - t0
                    break  # skip: no backward, no optimizer step on any rank
            engine.backward(loss_local)
            times["time_fwd_bwd_s"] += time.perf_counter() - t0
            t1 = time.perf_counter()
            engine.step()
            times["time_optimizer_s"] += time.perf_counter() - t1
            stepped = True
            z_last = (z1.detach(), z2.detach())
        return loss, stepped, stopping, z_last

    def _skip_step(self, stepped: bool) -> None:
        """Account for a non-finite step; stop (with a checkpoint) after too many in a row.

        stepped: the step's micro-batches reached DeepSpeed's optimizer step, which must have voided it.
        """
        engine = self.engine
        if stepped and engine.was_step_applied():
            raise TrainingError(
                "a non-finite loss reached an optimizer that does not skip such steps",
                where=self.spec.where("train.grad_accum"),
                hint="use ZeRO stage 1 or 2, or grad_accum 1",
            )
        self.scheduler.step()  # neither we nor DeepSpeed stepped it: keep the LR equal to the plan
        self.state.skipped_steps += 1
        self.state.consecutive_nonfinite += 1

    # ------------------------------------------------------------------ the loop

    def run(self, stop_at: int | None = None) -> TrainResult:
        """Train until the planned end, `stop_at` steps, or an agreed stop request."""
        from ds_simclr.health import CollapseWatch
        from ds_simclr.plots import view_slices
        from ds_simclr.telemetry import MetricsLog, Progress, WandbRun

        spec, total = self.spec, self.spec.train.total_steps
        end = min(total, stop_at) if stop_at is not None else total
        stop = self.stop or StopRequest()
        if self.stop is None:
            stop.install()
        metrics = wandb_run = progress = None
        if self.rank_zero:
            metrics = MetricsLog(self.paths.metrics, resume_step=self.state.step)
            wandb_run = WandbRun(
                self.paths,
                spec.logging.wandb_project,
                spec.logging.wandb_entity,
                spec.logging.wandb_mode,
                spec.name or self.paths.root.name,
                config={"spec": spec.model_dump(mode="json"), "deepspeed": self.ds_config, "world_size": self.place.world_size},
            )
            wandb_run.catch_up(metrics.rows_after(wandb_run.logged_through))
            progress = Progress(total, self.state.step)
            watch = CollapseWatch(spec.warmup_steps, self.batch.global_batch, spec.model.head_out)
        stopped_at_start = dist.any_rank_true(stop.signal is not None)  # during start-up: nothing to save
        result = TrainResult(self.paths.root, self.state.step, stopped_at_start, self.state.skipped_steps)
        pairs_per_step = self.batch.global_batch
        batches = self.loader.iterate(self.state.step)
        try:
            while self.state.step < end and not stopped_at_start:
                t0 = time.perf_counter()
                outcome = self._optimizer_step(batches, stop.signal is not None)
                row, stopping = outcome.row, outcome.stopping
                self.state.step += 1
                step_time = time.perf_counter() - t0
                if not row["skipped"]:
                    self.state.consecutive_nonfinite = 0
                    result.losses.append(row["loss"])
                row.update(
                    step=self.state.step,
                    epoch=(self.state.step - 1) // spec.train.steps_per_epoch,
                    skipped_steps=self.state.skipped_steps,
                    pairs_per_s=pairs_per_step / step_time,
                    views_per_s=2 * pairs_per_step / step_time,
                    time_step_s=step_time,
                )
                too_many_bad = self.state.consecutive_nonfinite >= spec.train.max_nonfinite_steps
                last = self.state.step == end
                image_now = spec.logging.image_every and self.state.step % spec.logging.image_every == 0
                eval_now = spec.eval.every_steps and self.state.step % spec.eval.every_steps == 0
                log_now = (self.state.step % spec.logging.log_every == 0 or last or stopping or row["skipped"]
                           or image_now or eval_now)
                if log_now:
                    row.update(self._monitoring(outcome))
                if self.rank_zero and log_now:
                    if eval_now:  # the other ranks wait at their next collective
                        row.update(self.probe(self.engine.module, self.dtype))
                    metrics.write(row)
                    wandb_run.log(row, {"views": view_slices(*self.sample_views)} if image_now else None)
                    progress.update(row)
                    warning = watch.check(row)
                    if warning:
                        progress.note(warning)
                if self.state.step % spec.checkpoint.every_steps == 0 or last or stopping or too_many_bad:
                    self.save_checkpoint()
                if too_many_bad:
                    raise TrainingError(
                        f"{self.state.consecutive_nonfinite} steps in a row had a non-finite loss; stopped at"
                        f" step {self.state.step} with a checkpoint",
                        where=self.spec.where("train.max_nonfinite_steps"),
                        hint="lower optimizer.lr or train.grad_clip, check the data",
                    )
                if stopping:
                    result.stopped_early = True
                    break
        finally:
            self.loader.close()
            if self.stop is None:
                stop.restore()
            if self.rank_zero:
                metrics.close()
                wandb_run.close()
            if self.lock is not None:
                self.lock.release()
        result.steps_done = self.state.step
        result.skipped_steps = self.state.skipped_steps
        if self.rank_zero:
            self._finish(result)
        return result

    def _finish(self, result: TrainResult) -> None:
        """Rank 0: write the plots and say where everything is."""
        from ds_simclr.plots import plot_run

        try:
            plots = ", ".join(p.name for p in plot_run(self.paths.root))
        except Exception as exc:  # a picture must never fail a finished run
            plots = f"not written ({exc}); run `ds_simclr plot {self.paths.root}`"
        state = "stopped early" if result.stopped_early else "finished"
        losses = f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else "nothing left to train"
        print(
            f"{state} at step {result.steps_done}/{self.spec.train.total_steps}: {losses},"
            f" {result.skipped_steps} skipped; run directory {self.paths.root}"
            f" (metrics.jsonl, checkpoints/, wandb/, plots/: {plots})",
            flush=True,
        )


def _on_rank_zero(build: Callable[[], Any], what: str) -> Any:
    """`build()` on rank 0 (None elsewhere); every rank raises when it failed, so none waits on it."""
    failure: UserError | None = None
    result = None
    if dist.is_rank_zero():
        try:
            result = build()
        except UserError as exc:
            failure = exc
    if not dist.all_ranks_true(failure is None):
        raise failure or DataError(f"rank 0 could not {what} (its error says why)")
    return result


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def train(spec: RunSpec, run_dir: Path | None = None, stop_at: int | None = None) -> TrainResult:
    """Train `spec` on this rank (every rank of the job calls this).

    The rank dies with whatever started it (see `lifeline`), and a stop signal is remembered from
    the first moment: during start-up it ends the job before the first step (nothing to save).
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    tie_to_launcher()
    stop = StopRequest()
    stop.install()
    try:
        return Trainer(spec, run_dir, stop).run(stop_at=stop_at)
    finally:
        stop.restore()
