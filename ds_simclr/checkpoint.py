"""Checkpoints that count only when complete: writing, choosing where to resume, pruning, and the
universal conversion that lets a run resume on another world size.

Layout of `<run>/checkpoints/`:

    step_<N>/             DeepSpeed's files of tag `step_<N>` plus `complete.json`, our marker
    step_<N>_universal/   DeepSpeed's universal checkpoint converted from step_<N> (plus a marker),
                          made once, the first time the run resumes on another world size
    latest                the tag of the newest complete checkpoint (for people and DeepSpeed tools)
    .staging/             checkpoints being written, and folders on their way out

Every rank writes its files into `.staging/step_<N>`; after all have returned, rank 0 lists the
files with their sizes in the marker (after flushing them to disk), renames the folder into place
and only then updates `latest`. So a `step_<N>` folder is complete unless something damaged it
later (a purge, a truncated file): the marker's sizes and, on resume, the CRCs inside every zip
file (torch.save writes zip archives) tell. A killed writer leaves only staging debris.

On resume the newest checkpoint that verifies is used; when `latest` names something else (a
missing or damaged folder, garbage) one warning line says so. When checkpoint folders or `latest`
exist but no checkpoint verifies, `CheckpointError` names them: a run never silently starts again
from step 0. DeepSpeed's own APIs do the rest (`save_checkpoint`, `load_checkpoint`, `ds_to_universal`
+ `checkpoint.load_universal`), so nothing here depends on DeepSpeed's file names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_simclr import __version__
from ds_simclr.atomic import fsync_dir, fsync_file, write_atomic
from ds_simclr.errors import CheckpointError

CHECKPOINT_FORMAT = "ds_simclr-checkpoint/1"
"""Version of the marker and of what a checkpoint holds (client state layout); bump on change."""
MARKER = "complete.json"
LATEST = "latest"
STAGING = ".staging"
UNIVERSAL_SUFFIX = "_universal"
TAG_PATTERN = re.compile(r"step_(\d+)")


def tag_for(step: int) -> str:
    """The checkpoint tag of optimizer step `step`."""
    return f"step_{step}"


def step_of(tag: str) -> int | None:
    """N of `step_<N>`, None for anything else."""
    match = TAG_PATTERN.fullmatch(tag)
    return int(match.group(1)) if match else None


def step_tags(checkpoints: Path) -> list[str]:
    """`step_<N>` folders, oldest first (by step number, not by name or time)."""
    if not checkpoints.is_dir():
        return []
    tags = [p.name for p in checkpoints.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(tags, key=lambda tag: step_of(tag) or 0)


def read_latest(checkpoints: Path) -> str | None:
    """What `latest` says (stripped, printable), or None when there is no such file."""
    path = checkpoints / LATEST
    if not path.is_file():
        return None
    try:
        return path.read_bytes()[:200].decode(errors="replace").strip()
    except OSError:
        return "<unreadable>"


# ------------------------------------------------------------------ the completion marker


@dataclass(frozen=True)
class Marker:
    """What `complete.json` vouches for: the step, how it was written, and every file's size."""

    step: int
    world_size: int
    partitioned_optimizer: bool
    """Optimizer state sharded over the ranks (ZeRO >= 1, or DeepSpeed's bf16 optimizer): loading
    it on another world size needs the universal conversion."""
    store: str | None
    """Identity of the store trained from (`store_identity`)."""
    ds_simclr: str
    files: dict[str, list[Any]]
    """Relative path -> [bytes, is a zip archive]."""
    universal_of: str | None = None

    def to_json(self) -> str:
        return json.dumps({"format": CHECKPOINT_FORMAT, **self.__dict__}, indent=1) + "\n"


def write_marker(folder: Path, step: int, world_size: int, partitioned_optimizer: bool, store: str | None,
                 universal_of: str | None = None) -> Marker:
    """Flush every file of `folder` to disk, then vouch for them in its marker (written last)."""
    files: dict[str, list[Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        fsync_file(path)
        files[str(path.relative_to(folder))] = [path.stat().st_size, zipfile.is_zipfile(path)]
    marker = Marker(step, world_size, partitioned_optimizer, store, __version__, files, universal_of)
    write_atomic(folder / MARKER, marker.to_json())
    return marker


class Incomplete(Exception):
    """A checkpoint folder that does not verify; the message says why (short, for one line)."""


def verify(folder: Path, deep: bool) -> Marker:
    """The marker of a complete checkpoint folder; `Incomplete` says why not.

    `deep` also checks the CRC of every member of every zip file (reads the whole checkpoint once).
    A marker of an unknown format is a `CheckpointError`: a newer ds_simclr wrote it.
    """
    if not folder.is_dir():
        raise Incomplete("missing")
    try:
        raw = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        raise Incomplete("no completion marker") from None
    except (OSError, ValueError):
        raise Incomplete("unreadable completion marker") from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise CheckpointError(
            f"checkpoint format {found!r}, which ds_simclr {__version__} cannot read (it reads {CHECKPOINT_FORMAT})",
            where=str(folder / MARKER),
            hint="resume with the ds_simclr version that wrote it",
        )
    try:
        marker = Marker(**{k: v for k, v in raw.items() if k != "format"})
    except TypeError:
        raise Incomplete("unreadable completion marker") from None
    for name, (size, is_zip) in marker.files.items():
        path = folder / name
        try:
            found = path.stat().st_size
        except OSError:
            raise Incomplete(f"{name} is missing") from None
        if found != size:
            raise Incomplete(f"{name} has {found} bytes, {size} were written")
        if deep and is_zip:
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (OSError, zipfile.BadZipFile, EOFError) as exc:
                raise Incomplete(f"{name} is damaged ({exc})") from None
            if bad is not None:
                raise Incomplete(f"{name} is damaged (CRC error in {bad})")
    return marker


# ------------------------------------------------------------------ where to resume


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from, and the one warning line to print when it is not `latest`'s."""

    tag: str
    marker: Marker
    warning: str | None


def find_resume_point(checkpoints: Path, deep: bool = True) -> ResumePoint | None:
    """The newest complete checkpoint; None for a run with no checkpoint (start at step 0).

    Raises CheckpointError (one line naming the folders and why each is incomplete) when checkpoint
    folders or a `latest` file exist but no checkpoint is complete.
    """
    tags = step_tags(checkpoints)
    latest = read_latest(checkpoints)
    problems: list[str] = []
    if latest is not None and latest not in tags:
        shown = latest if step_of(latest) is not None else repr(latest[:40])
        problems.append(f"latest names {shown} ({'missing' if step_of(latest) is not None else 'not a checkpoint tag'})")
    for tag in reversed(tags):
        try:
            marker = verify(checkpoints / tag, deep)
        except Incomplete as why:
            problems.append(f"{tag} is incomplete ({why})")
            continue
        warning = None
        if problems:
            warning = f"{'; '.join(problems)}: resuming from {tag}, the newest complete checkpoint"
        elif latest is None:
            warning = f"latest is missing: resuming from {tag}, the newest complete checkpoint"
        elif latest != tag:
            warning = f"latest names {latest}, but {tag} is complete and newer: resuming from {tag}"
        return ResumePoint(tag, marker, warning)
    if problems:
        raise CheckpointError(
            f"no complete checkpoint to resume from: {'; '.join(problems)}",
            where=str(checkpoints),
            hint="restore a checkpoint, or move checkpoints/ aside to start again from step 0",
        )
    return None


def check_store(point: ResumePoint, identity: str | None, store: Path) -> None:
    """Refuse to resume a checkpoint trained on another store."""
    if point.marker.store is not None and identity is not None and point.marker.store != identity:
        raise CheckpointError(
            f"{point.tag} was trained on a store with identity {point.marker.store}, but the data now"
            f" gives {store} with identity {identity}",
            where=f"checkpoints/{point.tag}",
            hint="resume with the run's own store, or choose another name/output_dir for a new run",
        )


def store_identity(store: Path) -> str:
    """A short hash of the store's index (`store.index_digest`): equal for the same preprocessed images."""
    from ds_simclr.data.store import index_digest

    return index_digest(store)[:16]


# ------------------------------------------------------------------ writing and pruning


def staging_folder(checkpoints: Path) -> Path:
    """Where DeepSpeed writes a checkpoint before it counts (`save_checkpoint(staging, tag)`)."""
    return checkpoints / STAGING


def discard(folder: Path, checkpoints: Path) -> None:
    """Remove a folder: first renamed into staging (atomic), then deleted, so a kill never leaves a
    half-deleted checkpoint where checkpoints live."""
    if not folder.exists():
        return
    trash = staging_folder(checkpoints) / f"trash-{folder.name}-{os.getpid()}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def commit(staged: Path, checkpoints: Path) -> Path:
    """Move a staged, marked folder into place (replacing a damaged folder of the same name)."""
    target = checkpoints / staged.name
    discard(target, checkpoints)
    os.replace(staged, target)
    fsync_dir(checkpoints)
    return target


def write_latest(checkpoints: Path, tag: str) -> None:
    write_atomic(checkpoints / LATEST, tag)


def prune(checkpoints: Path, keep_last: int, just_written: str) -> list[str]:
    """Keep `just_written` and the newest `keep_last - 1` complete checkpoints before it (by step);
    remove every other `step_<N>` folder with its universal conversion, and staging debris.

    Returns the tags removed. Folders of a later step than `just_written` are from a timeline this
    run abandoned (it resumed from an older checkpoint because they were damaged).
    """
    now = step_of(just_written)
    assert now is not None, just_written
    older = [t for t in step_tags(checkpoints) if (step_of(t) or 0) < now and (checkpoints / t / MARKER).is_file()]
    keep = {just_written, *(older[len(older) - (keep_last - 1):] if keep_last > 1 else [])}
    removed = []
    for tag in step_tags(checkpoints):
        if tag not in keep:
            discard(checkpoints / tag, checkpoints)
            removed.append(tag)
    for folder in checkpoints.glob(f"step_*{UNIVERSAL_SUFFIX}"):
        if folder.name.removesuffix(UNIVERSAL_SUFFIX) not in keep:
            discard(folder, checkpoints)
    shutil.rmtree(staging_folder(checkpoints), ignore_errors=True)
    return removed


# ------------------------------------------------------------------ another world size


def needs_universal(marker: Marker, world_size: int) -> bool:
    """True when the checkpoint's optimizer state is sharded over another number of ranks."""
    return marker.partitioned_optimizer and marker.world_size != world_size


def ensure_universal(checkpoints: Path, point: ResumePoint) -> str:
    """The tag of `point`'s universal conversion, made once (DeepSpeed's `ds_to_universal`).

    Runs `python -m deepspeed.checkpoint.ds_to_universal` (its public command line) into staging,
    marks the result and moves it beside the checkpoint, where pruning removes it with its checkpoint.
    """
    tag = point.tag + UNIVERSAL_SUFFIX
    try:
        verify(checkpoints / tag, deep=True)
        return tag
    except Incomplete:
        pass
    staged = staging_folder(checkpoints) / tag
    shutil.rmtree(staged, ignore_errors=True)
    staged.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(checkpoints / point.tag), "--output_folder", str(staged),
        "--inject_missing_state",  # our checkpoints carry no Megatron-style universal_checkpoint_info
        "--num_extract_workers", "1", "--num_merge_workers", "1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise CheckpointError(
            f"DeepSpeed could not convert {point.tag} for another world size: {lines[-1] if lines else result.returncode}",
            where=str(checkpoints / point.tag),
            hint=f"resume on its own world size ({point.marker.world_size} ranks)",
        )
    write_marker(staged, point.marker.step, point.marker.world_size, False, point.marker.store, universal_of=point.tag)
    commit(staged, checkpoints)
    return tag
