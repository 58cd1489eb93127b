"""nnSSL's `pretrain_data.json`, read as nnSSL writes it, flattened into a list of images.

Structure (strict): collection > datasets{key} > subjects{id} > sessions{id} > images[list], each
image with `name`, `image_path`, `modality`, optional `associated_masks` (`anonymization_mask`,
`anatomy_mask`) and free-form `*_info` dicts at every level. Paths may start with `$VAR/` (nnSSL's
`$nnssl_raw` habit), expanded from the environment; relative paths resolve against the manifest's folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import ValidationError

from ds_simclr.errors import DataError
from ds_simclr.specbase import StrictModel


MANIFEST_NAME = "pretrain_data.json"
"""nnSSL's file name for a manifest."""


class AssociatedMasks(StrictModel):
    """Optional masks beside an image (paths like `image_path`)."""

    anonymization_mask: str | None = None
    """Defacing/anonymisation mask; voxels outside were removed before release."""
    anatomy_mask: str | None = None
    """Foreground (e.g. brain/head) mask; preprocessing z-scores over it when given."""


class Image(StrictModel):
    """One volume of a session."""

    name: str
    """File name (nnSSL uses it, without extension, for the output name)."""
    image_path: str
    """Path of the volume (NIfTI, NRRD, MHA), absolute, `$VAR/...` or relative to the manifest."""
    modality: str
    """Free-form modality label, e.g. `T1w`, `T2w`, `FLAIR`; `data.modalities` filters on it."""
    image_info: dict[str, Any] | None = None
    """Free-form metadata."""
    associated_masks: AssociatedMasks | None = None
    """Masks beside the image."""


class Session(StrictModel):
    """One scanning session of a subject."""

    session_id: int | str | None = None
    """Repeated from the key by nnSSL's writer; the key wins."""
    session_info: dict[str, Any] | None = None
    """Free-form metadata."""
    images: list[Image] = []
    """Volumes acquired in the session."""


class Subject(StrictModel):
    """One subject of a dataset."""

    subject_id: str | None = None
    """Repeated from the key by nnSSL's writer; the key wins."""
    subject_info: dict[str, Any] | None = None
    """Free-form metadata."""
    sessions: dict[str, Session] = {}
    """Sessions by id."""


class Dataset(StrictModel):
    """One dataset of the collection."""

    dataset_index: int | str
    """Dataset id (e.g. `Dataset001_ABIDE`)."""
    name: str | None = None
    """Human-readable name."""
    dataset_info: dict[str, Any] | None = None
    """Free-form metadata."""
    subjects: dict[str, Subject] = {}
    """Subjects by id."""


class Collection(StrictModel):
    """The whole file: one collection of datasets."""

    collection_index: int | str
    """Collection id."""
    collection_name: str
    """Collection name (nnSSL names preprocessed folders after it)."""
    datasets: dict[str, Dataset]
    """Datasets by key."""


@dataclass(frozen=True)
class ManifestImage:
    """One image with its place in the collection, resolved paths and its dotted field in the file."""

    uid: str
    dataset: str
    subject: str
    session: str
    path: Path
    modality: str
    anatomy_mask: Path | None
    field: str


IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr")
"""File name endings of the volumes preprocessing reads (NIfTI through nibabel, the others through SimpleITK)."""
_EXTENSION = re.compile("(" + "|".join(re.escape(e) for e in IMAGE_EXTENSIONS) + ")$")


def image_uid(*parts: object) -> str:
    """An image's id: collection, dataset, subject, session and name joined by `__`, without the extension.

    Characters outside `[A-Za-z0-9._-]` become `-`, so two names can share an id; the id names the
    image's files in the store and must be unique in a manifest.
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "-", _EXTENSION.sub("", "__".join(str(p) for p in parts)))


def resolve_path(raw: str, base: Path, where: str) -> Path:
    """Expand a leading `$VAR/` from the environment, then resolve relative to `base`."""
    head, _, rest = raw.partition("/")
    if head.startswith("$"):
        value = os.environ.get(head[1:].strip("{}"))
        if value is None:
            raise DataError(f"path variable {head} is not set", where=where, hint=f"export {head[1:]}=/path/to/data")
        raw = str(Path(value) / rest)
    return Path(os.path.join(base, os.path.expanduser(raw)))  # one Path per image: pathlib is slow at 100k


def _dotted(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def load_collection(path: Path) -> Collection:
    """Parse and validate the file; schema errors name the file and the dotted field."""
    path = Path(path)
    if not path.is_file():
        raise DataError("manifest not found", where=str(path), hint="give the path of a pretrain_data.json")
    try:  # parsed and validated in one pass (no intermediate dicts: half the memory at 100k images)
        return Collection.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            raise DataError(f"not valid JSON: {err['ctx']['error']}", where=str(path)) from exc
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise DataError(
            f"{err['msg']}{more}", where=f"{path}: {_dotted(err['loc'])}", hint="see nnSSL's pretrain_data.json schema"
        ) from exc


def load_manifest(path: Path, *, modalities: list[str] | None = None, check_files: bool = True) -> list[ManifestImage]:
    """The flat list of images (optionally of some modalities); missing files raise a DataError."""
    path = Path(path)
    collection = load_collection(path)
    base = path.parent
    images: list[ManifestImage] = []
    for ds_key, ds in collection.datasets.items():
        for subj_key, subj in ds.subjects.items():
            for sess_key, sess in subj.sessions.items():
                for i, img in enumerate(sess.images):
                    field = f"datasets.{ds_key}.subjects.{subj_key}.sessions.{sess_key}.images[{i}]"
                    where = f"{path}: {field}"
                    if modalities is not None and img.modality not in modalities:
                        continue
                    masks = img.associated_masks
                    anat = masks.anatomy_mask if masks else None
                    images.append(
                        ManifestImage(
                            uid=image_uid(collection.collection_name, ds.dataset_index, subj_key, sess_key, img.name),
                            dataset=ds_key,
                            subject=subj_key,
                            session=sess_key,
                            path=resolve_path(img.image_path, base, f"{where}.image_path"),
                            modality=img.modality,
                            anatomy_mask=resolve_path(anat, base, f"{where}.associated_masks.anatomy_mask") if anat else None,
                            field=field,
                        )
                    )
    first: dict[str, ManifestImage] = {}
    for im in images:
        other = first.setdefault(im.uid, im)
        if other is not im:
            raise DataError(
                f"two images share the id {im.uid} (also {other.field})",
                where=f"{path}: {im.field}",
                hint="give images distinct names per session",
            )
    if check_files:
        missing = [(im, p) for im in images for p in (im.path, im.anatomy_mask) if p is not None and not p.is_file()]
        if missing:
            im, p = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"file not found: {p}{more}", where=f"{path}: {im.field}", hint="fix the path or remove the entry")
    return images


Row = tuple[str, str, str, str, str, str]
"""(dataset, subject, session, image name, image path, modality) of one image."""

_OPEN = (
    lambda key: f'{key}: {{"dataset_index": {key}, "name": {key}, "dataset_info": null, "subjects": {{',
    lambda key: f'{key}: {{"subject_id": {key}, "subject_info": null, "sessions": {{',
    lambda key: f'{key}: {{"session_id": {key}, "session_info": null, "images": [',
)
_CLOSE = ("}}", "}}", "]}")


def collection_json(name: str, rows: Iterable[Row]) -> Iterator[str]:
    """The text of a pretrain_data.json, in chunks, without building the document in memory.

    `rows` must come grouped by dataset, then subject, then session (as `load_manifest` lists images);
    a group that comes back after another raises ValueError (it would repeat a JSON key).
    """
    yield f'{{"collection_index": 1, "collection_name": {json.dumps(name)}, "datasets": {{'
    prev: list[str] = []
    closed: set[tuple[str, ...]] = set()
    for ds, subj, sess, img_name, img_path, modality in rows:
        key = [ds, subj, sess]
        same = 0
        while same < len(prev) and key[same] == prev[same]:
            same += 1
        for level in reversed(range(same, len(prev))):
            closed.add(tuple(prev[: level + 1]))
            yield _CLOSE[level]
        if same == 3:
            yield ", "
        for level in range(same, 3):
            if tuple(key[: level + 1]) in closed:
                raise ValueError(f"rows of {'/'.join(key[: level + 1])} are not contiguous")
            yield (", " if prev and level == same else "") + _OPEN[level](json.dumps(key[level]))
        image = {"name": img_name, "image_path": img_path, "modality": modality, "image_info": None, "associated_masks": None}
        yield json.dumps(image)
        prev = key
    yield "".join(_CLOSE[level] for level in reversed(range(len(prev)))) + "}}\n"

