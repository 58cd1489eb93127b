"""Manifest -> fingerprint + plan -> preprocessed patch store (nnU-Net's staged habit).

Per image (`process_image`): read (see `volume_io`; what it had to assume is noted), set NaN and
+-inf voxels to 0 (counted), find the foreground (`Plan.foreground`, see `foreground`), crop to its
box, z-score over the anatomy mask or else the foreground (voxels outside an Otsu foreground are
set to the background first), reorient to RAS, resample to the plan's spacing (see `resample`: cubic
B-spline, nearest across thick slices), write a float16 `.npy` and a JSON sidecar (the record).
Images run in parallel processes; a rerun skips images whose outputs exist. An image that cannot be
used (unreadable, one slice, several volumes, empty, constant) or that fails at any stage is
skipped and listed with its reason in `report.json`; the others are unaffected.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ds_simclr.data.foreground import FOREGROUNDS, Foreground
from ds_simclr.data.manifest import ManifestImage, collection_dict, load_manifest
from ds_simclr.data.store import STORE_DTYPE, StoreEntry, write_index
from ds_simclr.errors import DataError

if TYPE_CHECKING:
    from ds_simclr.data.volume_io import Grid

IMAGES_DIR = "images"


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
    """What a preprocessing run did; also written to `report.json`."""

    out_dir: Path
    processed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def store_size(self) -> int:
        return len(self.processed) + len(self.reused)


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

    The record: `entry` (the store index row), `source`, `fingerprint` (size, spacing, orientation,
    reader and intensity statistics of the original), `non_finite` (voxels set to 0), `foreground`
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
    rel = f"{IMAGES_DIR}/{item.uid}.npy"
    record = {
        "entry": {"id": item.uid, "file": rel, "shape": list(out.shape), "modality": item.modality, "pad_value": pad_value},
        "source": str(item.path),
        "fingerprint": finger,
        "non_finite": non_finite,
        "foreground": foreground,
        "resampling": resampling,
        "assumptions": assumptions,
    }
    tmp = out_dir / f"{rel}.tmp.npy"
    side = out_dir / IMAGES_DIR / f"{item.uid}.json"
    with _stage("writing failed"):
        try:
            np.save(tmp, out)
            tmp.replace(out_dir / rel)
            side.with_suffix(".json.tmp").write_text(json.dumps(record, indent=1))
            side.with_suffix(".json.tmp").replace(side)
        finally:
            tmp.unlink(missing_ok=True)
            side.with_suffix(".json.tmp").unlink(missing_ok=True)
    return record


def _worker(item: ManifestImage, plan: Plan, out_dir: Path) -> tuple[str, dict[str, Any] | None, str | None]:
    try:
        return item.uid, process_image(item, plan, out_dir), None
    except SkipImage as exc:
        return item.uid, None, str(exc)


def _init_worker() -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def _check_plan(out_dir: Path, plan: Plan, overwrite: bool) -> None:
    path = out_dir / "plan.json"
    wanted = json.loads(json.dumps(asdict(plan)))
    if path.is_file() and not overwrite and json.loads(path.read_text()) != wanted:
        raise DataError(
            "this store was preprocessed with another plan", where=str(path), hint="use --overwrite or another OUT folder"
        )
    _write_json(path, wanted)


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
    """Preprocess every image of an nnSSL manifest into a patch store at `out_dir`.

    Writes `plan.json`, `fingerprint.json`, `images/*.npy` (+ sidecars), `store.json` (the index the
    loader reads), `pretrain_data.json` (the preprocessed images in nnSSL's format) and `report.json`.
    `jobs` processes work in parallel; finished images are reused unless `overwrite`. `foreground`
    is `Plan.foreground`.
    """
    if jobs < 1:
        raise DataError(f"jobs must be >= 1, got {jobs}", where="--jobs")
    plan = Plan(target_spacing=(spacing, spacing, spacing), foreground=foreground)
    items = load_manifest(Path(manifest_path))
    out_dir = Path(out_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    _check_plan(out_dir, plan, overwrite)
    report = Report(out_dir=out_dir)
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for item in items:
        side = out_dir / IMAGES_DIR / f"{item.uid}.json"
        if not overwrite and side.is_file() and (out_dir / IMAGES_DIR / f"{item.uid}.npy").is_file():
            records[item.uid] = json.loads(side.read_text())
            report.reused.append(item.uid)
        else:
            todo.append(item)
    by_uid = {item.uid: item for item in items}

    def collect(uid: str, record: dict[str, Any] | None, reason: str | None) -> None:
        if record is None:
            report.skipped.append({"id": uid, "path": str(by_uid[uid].path), "reason": reason or ""})
        else:
            records[uid] = record
            report.processed.append(uid)

    bar = _progress(progress)
    with bar:
        task = bar.add_task("preprocessing", total=len(todo))
        if jobs == 1 or len(todo) <= 1:
            for item in todo:
                collect(*_worker(item, plan, out_dir))
                bar.advance(task)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=ctx, initializer=_init_worker) as pool:
                futures = [pool.submit(_worker, item, plan, out_dir) for item in todo]
                for fut in as_completed(futures):
                    collect(*fut.result())
                    bar.advance(task)
    _finish(out_dir, items, records, report)
    return report


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not enabled
    )


def _finish(out_dir: Path, items: list[ManifestImage], records: dict[str, dict[str, Any]], report: Report) -> None:
    done = [item for item in items if item.uid in records]
    entries = [StoreEntry(**{**records[i.uid]["entry"], "shape": tuple(records[i.uid]["entry"]["shape"])}) for i in done]
    _write_json(out_dir / "fingerprint.json", {i.uid: records[i.uid]["fingerprint"] | {"source": records[i.uid]["source"]} for i in done})
    rows = [(i.dataset, i.subject, i.session, i.uid, records[i.uid]["entry"]["file"], i.modality) for i in done]
    _write_json(out_dir / "pretrain_data.json", collection_dict("preprocessed", rows))
    _write_json(
        out_dir / "report.json",
        {"processed": report.processed, "reused": report.reused, "skipped": report.skipped, "store_size": report.store_size},
    )
    if entries:
        write_index(out_dir, entries)
    if not entries:
        raise DataError(
            f"no usable image ({len(report.skipped)} skipped)", where=str(out_dir / "report.json"), hint="see the reasons there"
        )
