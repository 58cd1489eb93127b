"""Manifest -> fingerprint + plan -> preprocessed patch store (nnU-Net's staged habit).

Per image (SimpleITK): read (see `volume_io`), reorient to RAS, crop to the non-zero box, z-score
over the anatomy mask (or the non-zero voxels), resample to the plan's spacing (B-spline for images,
nearest for masks), write a float16 `.npy` and a JSON sidecar. Images run in parallel processes; a
rerun skips images whose outputs exist. An image that cannot be used (unreadable, not 3D, empty,
non-finite) is skipped and listed with its reason in `report.json`; the others are unaffected.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ds_simclr.atomic import atomic_path, write_atomic
from ds_simclr.data.manifest import ManifestImage, collection_dict, load_manifest
from ds_simclr.data.store import STORE_DTYPE, StoreEntry, write_index
from ds_simclr.errors import DataError

IMAGES_DIR = "images"


@dataclass(frozen=True)
class Plan:
    """How every image is preprocessed; written to plan.json and checked on reruns."""

    target_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: str = "RAS"
    normalization: str = "zscore over anatomy_mask, else over non-zero voxels"
    image_interpolation: str = "bspline3"
    mask_interpolation: str = "nearest"
    dtype: str = "float16"


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


def _fingerprint(img: Any, arr: np.ndarray, fg: np.ndarray, reader: str) -> dict[str, Any]:
    import SimpleITK as sitk

    vals = arr[fg]
    return {
        "shape": list(img.GetSize()),
        "spacing": list(img.GetSpacing()),
        "orientation": sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection()),
        "reader": reader,
        "mean": float(vals.mean()),
        "std": float(vals.std()),
        "min": float(vals.min()),
        "max": float(vals.max()),
        "p00_5": float(np.percentile(vals, 0.5)),
        "p99_5": float(np.percentile(vals, 99.5)),
    }


def _resample(img: Any, spacing: tuple[float, float, float], interp: int, default: float) -> Any:
    import SimpleITK as sitk

    size = [max(1, int(round(n * s / t))) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing)]
    return sitk.Resample(
        img, size, sitk.Transform(), interp, img.GetOrigin(), spacing, img.GetDirection(), default, sitk.sitkFloat32
    )


def process_image(item: ManifestImage, plan: Plan, out_dir: Path) -> dict[str, Any]:
    """Preprocess one image into the store; returns its sidecar record or raises SkipImage."""
    import SimpleITK as sitk

    from ds_simclr.data.volume_io import NotAVolume, read_volume

    try:
        img, reader = read_volume(item.path)
    except NotAVolume as exc:
        raise SkipImage(str(exc)) from exc
    except Exception as exc:  # any reader failure means this file is unusable, not a bug of ours
        raise SkipImage(f"unreadable: {' '.join(str(exc).split())[:200]}") from exc
    img = sitk.DICOMOrient(img, plan.orientation)
    arr = sitk.GetArrayFromImage(img)
    if not np.isfinite(arr).all():
        raise SkipImage("contains NaN or infinite values")
    mask = None
    if item.anatomy_mask is not None:
        try:
            m_img, _ = read_volume(item.anatomy_mask)
            m_img = sitk.DICOMOrient(m_img, plan.orientation)
        except Exception as exc:
            raise SkipImage(f"anatomy mask unreadable: {' '.join(str(exc).split())[:200]}") from exc
        if m_img.GetSize() != img.GetSize():
            raise SkipImage(f"anatomy mask size {m_img.GetSize()} differs from image size {img.GetSize()}")
        mask = sitk.GetArrayFromImage(m_img) > 0
    nonzero = arr != 0
    if not nonzero.any():
        raise SkipImage("empty image (all voxels are zero)")
    fg = mask if mask is not None and mask.any() else nonzero
    finger = _fingerprint(img, arr, fg, reader)
    if finger["std"] <= 0:
        raise SkipImage("constant foreground (zero standard deviation)")
    box = np.argwhere(nonzero)
    (z0, y0, x0), (z1, y1, x1) = box.min(0), box.max(0) + 1
    img = img[int(x0) : int(x1), int(y0) : int(y1), int(z0) : int(z1)]
    mean, std = finger["mean"], finger["std"]
    img = sitk.ShiftScale(img, -mean, 1.0 / std)
    pad_value = -mean / std
    img = _resample(img, plan.target_spacing, sitk.sitkBSpline, pad_value)
    out = sitk.GetArrayFromImage(img).astype(STORE_DTYPE)
    rel = f"{IMAGES_DIR}/{item.uid}.npy"
    with atomic_path(out_dir / rel) as tmp:
        np.save(tmp, out)
    record = {
        "entry": {"id": item.uid, "file": rel, "shape": list(out.shape), "modality": item.modality, "pad_value": pad_value},
        "source": str(item.path),
        "fingerprint": finger,
    }
    side = out_dir / IMAGES_DIR / f"{item.uid}.json"
    write_atomic(side, json.dumps(record, indent=1))
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
    write_atomic(path, json.dumps(payload, indent=1, default=str))


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
) -> Report:
    """Preprocess every image of an nnSSL manifest into a patch store at `out_dir`.

    Writes `plan.json`, `fingerprint.json`, `images/*.npy` (+ sidecars), `store.json` (the index the
    loader reads), `pretrain_data.json` (the preprocessed images in nnSSL's format) and `report.json`.
    `jobs` processes work in parallel; finished images are reused unless `overwrite`.
    """
    if jobs < 1:
        raise DataError(f"jobs must be >= 1, got {jobs}", where="--jobs")
    items = load_manifest(Path(manifest_path))
    out_dir = Path(out_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    plan = Plan(target_spacing=(spacing, spacing, spacing))
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
