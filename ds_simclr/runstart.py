"""Where a job starts in a run directory: the checks that may refuse it, then the decisions.

`check_run_dir` is everything about the run directory that can refuse a start without writing
anything (a changed spec, checkpoints of which none is complete, another store); `launch` runs it
after the batch plan for its world size (`plan_batch`), once before it makes the data ready (so a
refusal never waits for preprocessing) and once with the ready store before it writes the run
directory; rank 0 runs it again before it writes. `plan_start`
then picks the checkpoint (printing the one fallback warning), refuses another store, and makes the
universal conversion when the world size changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ds_simclr.checkpoint import (
    ResumePoint,
    check_store,
    ensure_universal,
    find_resume_point,
    needs_universal,
    store_identity,
)
from ds_simclr.errors import warn
from ds_simclr.rundir import RunPaths, check_resumable
from ds_simclr.spec import RunSpec


@dataclass(frozen=True)
class Start:
    """How this job begins: at `step` (0 = fresh), loading `load_tag` (None = fresh)."""

    step: int
    load_tag: str | None
    universal: bool
    """`load_tag` is a universal checkpoint (saved on another world size)."""
    store_identity: str | None
    saved_world_size: int | None = None


def check_run_dir(paths: RunPaths, spec: RunSpec, store: Path | None = None) -> ResumePoint | None:
    """Refuse (one-line errors) what cannot start; the checkpoint to resume from, if any. Writes nothing.

    `store`: the store the job will train from, when it is ready (checked against the checkpoint's).
    """
    check_resumable(paths, spec)
    point = find_resume_point(paths.checkpoints)
    if point is not None and store is not None:
        check_store(point, store_identity(store), store)
    return point


def plan_start(paths: RunPaths, point: ResumePoint | None, store: Path, world_size: int) -> Start:
    """Rank 0, after `check_run_dir`: warn once about a fallback, convert for a new world size."""
    identity = store_identity(store)
    if point is None:
        return Start(0, None, False, identity)
    if point.warning:
        warn(point.warning)
    marker = point.marker
    if needs_universal(marker, world_size):
        tag = ensure_universal(paths.checkpoints, point)
        return Start(marker.step, tag, True, identity, marker.world_size)
    return Start(marker.step, point.tag, False, identity, marker.world_size)
