"""Manifest -> fingerprint + plan -> preprocessed patch store (nnU-Net's staged habit).

Per image (`process_image`): read (see `volume_io`; what it had to assume is noted), set NaN and
+-inf voxels to 0 (counted), find the foreground (`Plan.foreground`, see `foreground`), crop to its
box, z-score over the anatomy mask or else the foreground (voxels outside an Otsu foreground are
set to the background first), reorient to RAS, resample to the plan's spacing (see `resample`: cubic
B-spline, nearest across thick slices), write a float16 `.npy` into the store (`store.volume_file`)
and then its sidecar `<id>.json` (the record). The sidecar is the unit of progress: an image that has
one is finished, and a rerun (also after a kill) reuses it. An image that cannot be used (unreadable,
one slice, several volumes, empty, constant) or that fails at any stage gets `<id>.skip.json` with
the reason instead (the others are unaffected), and a rerun tries it again. Images run in parallel
processes; the main process keeps ids and counts, never the images' records.

`build_index` then assembles the store from the sidecars of the manifest's images, in manifest
order: fingerprint.json, pretrain_data.json and report.json (written as streams), the index, and
store.json last. It reads only files, so it can run alone once every image has a sidecar.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ds_simclr.atomic import write_atomic
from ds_simclr.data.foreground import FOREGROUNDS, Foreground
from ds_simclr.data.manifest import ManifestImage, collection_json, load_manifest
from ds_simclr.data.store import (
    FORMAT_NAME,
    IMAGES_DIR,
    INDEX_NAME,
    STORE_DTYPE,
    sidecar_file,
    volume_file,
    write_index,
    write_volume,
)
from ds_simclr.errors import DataError

if TYPE_CHECKING:
    from ds_simclr.data.volume_io import Grid

SKIP_SUFFIX = ".skip.json"


@dataclass(frozen=True)
class Plan:
    """How every image is preprocessed; written to plan.json and checked on reruns."""

    target_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: str = "RAS"
    normalization: str = "zscore over anatomy_mask, else over non-zero voxels"
    foreground: Foreground = "nonzero"
    """Voxels that are the subject, for cropping and z-score statistics: `nonzero` (nnSSL's rule) or
    `otsu` (a head mask for raw heads with a noisy background; see `ds_simclr.data.foreground`)."""
    image_interpolation: str = "bspline3"
    mask_interpolation: str = "nearest"
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.foreground not in FOREGROUNDS:
            raise DataError(f"unknown foreground {self.foreground!r}", where="foreground", hint=f"one of {', '.join(FOREGROUNDS)}")


@dataclass
class Report:
    """What a preprocessing run did; also written to `report.json` (ids in manifest order)."""

    out_dir: Path
    processed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    """Wall time of the run, index included."""

    @property
    def store_size(self) -> int:
        return len(self.processed) + len(self.reused)

    def summary(self) -> str:
        """The one line `data preprocess` and `launch` print."""
        counts = f"{len(self.processed)} preprocessed, {len(self.reused)} reused, {len(self.skipped)} skipped"
        return f"{counts} in {self.seconds:.1f} s -> {self.out_dir}"

    def skipped_lines(self) -> list[str]:
        return [f"  skipped {s['path']}: {s['reason']}" for s in self.skipped]


class SkipImage(Exception):
    """This image cannot be used; the message is the reason given in the report."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


@contextmanager
def _stage(failure: str) -> Iterator[None]:
    """Any error inside, but SkipImage, becomes SkipImage("<failure>: <error type>: <message>")."""
    try:
        yield
    except SkipImage:
        raise
    except Exception as exc:  # one image's failure, whatever it is, must not end the run
        raise SkipImage(f"{failure}: {type(exc).__name__}: {_one_line(exc)}") from exc


def _statistics(array: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """Mean, std (population), min, max and 0.5/99.5 percentiles of `array[region]`.

    Works on one float32 copy of the region's values (no float64 copy); sums in float64.
    """
    values = array[region]
    stats = {"mean": float(values.mean(dtype=np.float64)), "min": float(values.min()), "max": float(values.max())}
    low, high = np.percentile(values, [0.5, 99.5], overwrite_input=True)
    values -= np.float32(stats["mean"])
    np.square(values, out=values)
    stats |= {"std": float(np.sqrt(values.mean(dtype=np.float64))), "p00_5": float(low), "p99_5": float(high)}
    return stats


def _read_anatomy_mask(path: Path, like: Grid, shape: tuple[int, ...]) -> np.ndarray:
    from ds_simclr.data.volume_io import read_volume

    mask = read_volume(path)
    if mask.array.shape != shape:
        raise SkipImage(f"anatomy mask size {list(mask.array.shape[::-1])} differs from image size {list(shape[::-1])}")
    if not np.allclose(mask.grid.direction, like.direction, atol=1e-3) or not np.allclose(mask.grid.spacing, like.spacing, rtol=1e-3):
        raise SkipImage("anatomy mask grid (spacing or direction) differs from the image's")
    return mask.array > 0


def process_image(item: ManifestImage, plan: Plan, out_dir: Path) -> dict[str, Any]:
    """Preprocess one image into the store; returns its sidecar record or raises SkipImage.

    The record: `id`, `shape`, `modality`, `pad_value` (the store index row), `source`,
    `fingerprint` (size, spacing, orientation, reader and intensity statistics of the original), `non_finite` (voxels set to 0), `foreground`
    (method, voxels, threshold), `resampling` (mode, slice axis, original spacing) and `assumptions`
    (what was assumed or repaired, in words). Memory: a few times the volume's float32 size.
    """
    with _stage("preprocessing failed"):
        return _process_image(item, plan, out_dir)


def _process_image(item: ManifestImage, plan: Plan, out_dir: Path) -> dict[str, Any]:
    import SimpleITK as sitk

    from ds_simclr.data.foreground import bounding_box, foreground_mask, zero_non_finite
    from ds_simclr.data.resample import resample
    from ds_simclr.data.volume_io import NotAVolume, read_volume

    with _stage("unreadable"):
        try:
            vol = read_volume(item.path)
        except NotAVolume as exc:
            raise SkipImage(str(exc)) from exc
    array, grid, reader, assumptions = vol.array, vol.grid, vol.reader, vol.assumptions
    del vol
    non_finite = zero_non_finite(array)
    if not array.any():
        if non_finite:
            raise SkipImage(f"no finite foreground ({non_finite} non-finite voxels, all others zero)")
        raise SkipImage("empty image (all voxels are zero)")
    with _stage("foreground failed"):
        fg, threshold = foreground_mask(array, grid.spacing, plan.foreground)
    box = bounding_box(fg)
    if box is None:
        raise SkipImage(f"no foreground found ({plan.foreground})")
    region = fg
    if item.anatomy_mask is not None:
        with _stage("anatomy mask unreadable"):
            mask = _read_anatomy_mask(item.anatomy_mask, grid, array.shape)
        region = mask if mask.any() else fg
    with _stage("statistics failed"):
        stats = _statistics(array, region)
    if stats["std"] <= 0:
        raise SkipImage("constant foreground (zero standard deviation)")
    finger = {
        "shape": list(array.shape[::-1]),
        "spacing": list(grid.spacing),
        "orientation": sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(grid.direction),
        "reader": reader,
    } | stats
    foreground = {"method": plan.foreground, "voxels": int(np.count_nonzero(fg)), "threshold": threshold}
    mean, std = stats["mean"], stats["std"]
    pad_value = -mean / std
    crop = array[box].copy()
    if plan.foreground != "nonzero":
        crop[~fg[box]] = 0  # outside the subject is background, as zeros are for `nonzero`
    del array, fg, region
    crop -= np.float32(mean)
    crop *= np.float32(1.0 / std)
    with _stage("reorientation failed"):
        img = grid.image(crop, (box[0].start, box[1].start, box[2].start))
        del crop
        img = sitk.DICOMOrient(img, plan.orientation)
    with _stage("resampling failed"):
        img, resampling = resample(img, plan.target_spacing, pad_value)
        out = sitk.GetArrayViewFromImage(img).astype(STORE_DTYPE)
        del img
    record = {
        "id": item.uid,
        "shape": list(out.shape),
        "modality": item.modality,
        "pad_value": pad_value,
        "source": str(item.path),
        "fingerprint": finger,
        "non_finite": non_finite,
        "foreground": foreground,
        "resampling": resampling,
        "assumptions": assumptions,
    }
    with _stage("writing failed"):
        write_volume(out_dir, item.uid, out)
        write_atomic(out_dir / sidecar_file(item.uid), json.dumps(record, indent=1))
    return record


def _worker(item: ManifestImage, plan: Plan, out_dir: Path) -> tuple[str, str | None]:
    """Preprocess one image; (id, None) when finished, (id, reason) when skipped (a skip sidecar says why)."""
    skip = out_dir / sidecar_file(item.uid, SKIP_SUFFIX)
    try:
        process_image(item, plan, out_dir)
    except SkipImage as exc:
        for stale in (sidecar_file(item.uid), volume_file(item.uid)):
            (out_dir / stale).unlink(missing_ok=True)
        write_atomic(skip, json.dumps({"id": item.uid, "path": str(item.path), "reason": str(exc)}) + "\n")
        return item.uid, str(exc)
    skip.unlink(missing_ok=True)
    return item.uid, None


def _init_worker() -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _check_plan(out_dir: Path, plan: Plan, overwrite: bool) -> None:
    path = out_dir / "plan.json"
    wanted = json.loads(json.dumps(asdict(plan)))
    if path.is_file() and not overwrite and json.loads(path.read_text()) != wanted:
        raise DataError(
            "this store was preprocessed with another plan", where=str(path), hint="use --overwrite or another OUT folder"
        )
    write_atomic(path, json.dumps(wanted, indent=1) + "\n")


def _check_format(out_dir: Path, overwrite: bool) -> None:
    """Refuse to add to a store of another format; with `overwrite`, clear its index and flat files."""
    path = out_dir / INDEX_NAME
    if not path.is_file():
        return
    try:
        found = json.loads(path.read_text()).get("format")
    except ValueError:
        found = None
    if found == FORMAT_NAME and not overwrite:
        return
    if found != FORMAT_NAME and not overwrite:
        raise DataError(
            f"holds a store of format {found}, not {FORMAT_NAME}", where=str(path), hint="use --overwrite or another OUT folder"
        )
    path.unlink()  # incomplete until the new index is written
    images = out_dir / IMAGES_DIR
    if found != FORMAT_NAME and images.is_dir():  # format 1 kept every file directly in images/
        for entry in images.iterdir():
            if entry.is_file():
                entry.unlink()


def finished_images(out_dir: Path) -> set[str]:
    """Ids whose sidecar and volume exist: one directory listing per subfolder, no per-image stat.

    (A killed run may leave a hidden temporary per image in flight; it never counts, and it is not
    removed here because another process may be writing it.)
    """
    done: set[str] = set()
    images = out_dir / IMAGES_DIR
    if not images.is_dir():
        return done
    for folder in os.scandir(images):
        if not folder.is_dir():
            continue
        names = {entry.name for entry in os.scandir(folder.path)}
        for name in names:
            uid = name[: -len(".json")]
            if name.endswith(".json") and not name.endswith(SKIP_SUFFIX) and f"{uid}.npy" in names:
                done.add(uid)
    return done


def preprocess(
    manifest_path: Path,
    out_dir: Path,
    *,
    jobs: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    spacing: float = 1.0,
    foreground: Foreground = "nonzero",
) -> Report:
    """Preprocess every image of an nnSSL manifest into a patch store at `out_dir` (see the module docstring).

    Writes `plan.json`, `images/<bb>/<id>.npy` + sidecars, then `build_index`'s files. `jobs`
    processes work in parallel; finished images are reused unless `overwrite`. `foreground` is
    `Plan.foreground`.
    """
    started = time.monotonic()
    if jobs < 1:
        raise DataError(f"jobs must be >= 1, got {jobs}", where="--jobs")
    plan = Plan(target_spacing=(spacing, spacing, spacing), foreground=foreground)
    items = load_manifest(Path(manifest_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_format(out_dir, overwrite)
    _check_plan(out_dir, plan, overwrite)
    finished = set() if overwrite else finished_images(out_dir)
    todo = [item for item in items if item.uid not in finished]
    del finished
    processed: set[str] = set()
    with _Progress(len(todo), progress) as bar:
        for uid, reason in _run(todo, plan, out_dir, jobs):
            if reason is None:
                processed.add(uid)
            bar.advance()
    report = build_index(out_dir, items, processed=processed, manifest_path=Path(manifest_path))
    report.seconds = time.monotonic() - started
    return report


def _run(todo: list[ManifestImage], plan: Plan, out_dir: Path, jobs: int) -> Iterator[tuple[str, str | None]]:
    """Results as images finish; at most 4 x jobs images handed to the workers at a time."""
    if jobs == 1 or len(todo) <= 1:
        for item in todo:
            yield _worker(item, plan, out_dir)
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(min(jobs, len(todo)), mp_context=ctx, initializer=_init_worker)
    try:
        queue = iter(todo)
        pending: set[Future] = {pool.submit(_worker, item, plan, out_dir) for item in itertools.islice(queue, 4 * jobs)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
            pending |= {pool.submit(_worker, item, plan, out_dir) for item in itertools.islice(queue, len(done))}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """A live bar in a terminal (rich); in a batch log, a plain line at most every `every_s` seconds."""

    def __init__(self, total: int, enabled: bool, every_s: float = 30.0) -> None:
        self.total, self.enabled, self.every_s = total, enabled and total > 0, every_s
        self.done, self.started, self.last = 0, time.monotonic(), time.monotonic()
        self.bar: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = (TextColumn("preprocessing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self.bar = Progress(*columns, console=Console(stderr=True))
            self.task = self.bar.add_task("", total=self.total)
            self.bar.start()
        return self

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)
        elif self.enabled and (time.monotonic() - self.last >= self.every_s or self.done == self.total):
            self.last = time.monotonic()
            rate = self.done / max(self.last - self.started, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"preprocessing {self.done}/{self.total} images, {rate:.1f}/s, eta {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


@dataclass
class _IndexRows:
    ids: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    pad_values: list[float] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)


def _fingerprints(out_dir: Path, items: list[ManifestImage], rows: _IndexRows, skipped: list[dict[str, str]]) -> Iterator[str]:
    """fingerprint.json's text, from the sidecars; fills `rows` and `skipped` on the way."""
    yield "{"
    missing = []
    for item in items:
        try:
            record = json.loads((out_dir / sidecar_file(item.uid)).read_text())
        except FileNotFoundError:
            try:
                skipped.append(json.loads((out_dir / sidecar_file(item.uid, SKIP_SUFFIX)).read_text()))
            except FileNotFoundError:
                missing.append(item)
            continue
        yield ("\n" if not rows.ids else ",\n") + f"{json.dumps(item.uid)}: " + json.dumps(record["fingerprint"] | {"source": record["source"]})
        rows.ids.append(item.uid)
        rows.shapes.append(record["shape"])
        rows.pad_values.append(record["pad_value"])
        rows.modalities.append(record["modality"])
    if missing:
        raise DataError(
            f"{len(missing)} images have no sidecar (e.g. {missing[0].uid}): their preprocessing has not finished",
            where=str(out_dir),
            hint="run `ds_simclr data preprocess` again; it reuses the finished images",
        )
    yield "\n}\n"


def build_index(out_dir: Path, items: list[ManifestImage], *, processed: set[str], manifest_path: Path | None = None) -> Report:
    """Assemble the store from the sidecars of `items` (store.json last); `processed`: ids done by this run."""
    out_dir = Path(out_dir)
    report = Report(out_dir=out_dir)
    rows = _IndexRows()
    write_atomic(out_dir / "fingerprint.json", _fingerprints(out_dir, items, rows, report.skipped))
    done = set(rows.ids)
    for uid in rows.ids:
        (report.processed if uid in processed else report.reused).append(uid)
    kept = (i for i in items if i.uid in done)
    preprocessed = ((i.dataset, i.subject, i.session, i.uid, volume_file(i.uid), i.modality) for i in kept)
    write_atomic(out_dir / "pretrain_data.json", collection_json("preprocessed", preprocessed))
    write_atomic(out_dir / "report.json", _report_json(report))
    if not rows.ids:
        raise DataError(
            f"no usable image ({len(report.skipped)} skipped)", where=str(out_dir / "report.json"), hint="see the reasons there"
        )
    write_index(out_dir, rows.ids, rows.shapes, rows.pad_values, rows.modalities, manifest=manifest_path)
    return report


def _report_json(report: Report) -> Iterator[str]:
    yield f'{{"store_size": {report.store_size},\n"skipped": {json.dumps(report.skipped, indent=1)}'
    for name in ("processed", "reused"):
        ids = getattr(report, name)
        yield f',\n"{name}": [' + ",\n".join(json.dumps(uid) for uid in ids) + "]"
    yield "}\n"
