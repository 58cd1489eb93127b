"""Write nnSSL's `pretrain_data.json` from scans found on disk: BIDS datasets, plain folders, tables.

The sources (`manifest_bids.scan_bids`, `manifest_files.scan_folder` / `scan_table`) each return
`FoundDataset`s: images with their subject, session, modality and metadata, plus what they skipped
and why. `build_collection` turns them into the manifest (nnSSL's layout, validated by our model,
`ds_simclr.data.manifest.Collection`) with paths relative to the manifest's folder or behind a
`$VARIABLE` (nnSSL's `$nnssl_raw` habit), after the checks a user needs before training: every
dataset has images, dataset keys and image ids are unique. `write_manifest` writes it atomically.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds_simclr.data.manifest import MANIFEST_NAME, Collection, image_uid
from ds_simclr.errors import DataError, UserError
from ds_simclr.atomic import write_atomic

DEFAULT_SESSION = "ses-DEFAULT"
"""Session key of images without a session (nnSSL's OpenMind conversion uses the same)."""


@dataclass(frozen=True)
class FoundImage:
    """One volume a source found; `path` is absolute."""

    subject: str
    session: str
    path: Path
    modality: str
    image_info: dict[str, Any] | None = None


@dataclass(frozen=True)
class Skipped:
    """A file left out of the manifest that a user would expect in it, and why."""

    path: Path
    reason: str


@dataclass
class FoundDataset:
    """What a source found in one ROOT (or one table's dataset column value)."""

    key: str
    """Dataset key and `dataset_index` in the manifest (the ROOT's folder name)."""
    where: str
    """The ROOT or table that errors name."""
    name: str | None = None
    info: dict[str, Any] | None = None
    images: list[FoundImage] = field(default_factory=list)
    subject_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    session_info: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)
    """Files left out on purpose, counted by kind (e.g. `bold images (not selected)`, `paths in .bidsignore`)."""

    def summary(self) -> str:
        """One line: subjects, sessions, images per modality, then what was ignored and skipped."""
        subjects = {im.subject for im in self.images}
        sessions = {(im.subject, im.session) for im in self.images}
        per_modality = Counter(im.modality for im in self.images)
        modalities = ", ".join(f"{m} {n}" for m, n in sorted(per_modality.items()))
        label = f"{self.key} ({self.name})" if self.name and self.name != self.key else self.key
        line = f"{label}: {len(subjects)} subjects, {len(sessions)} sessions, {len(self.images)} images ({modalities})"
        if self.ignored:
            line += "; ignored " + ", ".join(f"{n} {kind}" for kind, n in sorted(self.ignored.items()))
        if self.skipped:
            line += f"; skipped {len(self.skipped)}"
        return line


def check_root(root: Path) -> Path:
    """The absolute folder, or a DataError naming a ROOT that is missing or not a folder."""
    if not root.exists():
        raise DataError("no such folder", where=str(root), hint="give the folder that holds the scans")
    if not root.is_dir():
        raise DataError("not a folder", where=str(root), hint="give the folder that holds the scans, or --table FILE")
    return Path(os.path.abspath(root))


_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
BROKEN_LINK = "a symbolic link to a missing file (a DataLad/git-annex file not fetched yet? `datalad get` it)"


def cell_value(text: str) -> Any:
    """A TSV/CSV cell as JSON: a number if it is written as a JSON number (`007`, `nan` stay text), None for `n/a`."""
    text = text.strip()
    if text in ("", "n/a"):
        return None
    return json.loads(text) if _JSON_NUMBER.fullmatch(text) else text


class _PathWriter:
    """Image paths as the manifest stores them: relative to its folder, or `$NAME/...` (one relpath per folder)."""

    def __init__(self, out_dir: Path, root_var: tuple[str, Path] | None) -> None:
        self.out_dir, self.root_var = str(out_dir), root_var
        self.prefixes: dict[str, str] = {}

    def __call__(self, path: Path) -> str:
        folder, _, file_name = str(path).rpartition(os.sep)
        if folder not in self.prefixes:
            self.prefixes[folder] = self._prefix(folder)
        return self.prefixes[folder] + file_name

    def _prefix(self, folder: str) -> str:
        if self.root_var is None:
            rel = os.path.relpath(folder, self.out_dir)
            return "" if rel == "." else Path(rel).as_posix() + "/"
        name, base = self.root_var
        try:
            rel = Path(folder).relative_to(base).as_posix()
        except ValueError:
            raise DataError(
                f"{folder} is not under ${name} ({base})", where="--root-var", hint=f"set {name} to a folder above every ROOT"
            ) from None
        return f"${name}/" if rel == "." else f"${name}/{rel}/"


def root_variable(name: str | None) -> tuple[str, Path] | None:
    """(NAME, its absolute folder) for `--root-var NAME`; the variable must be set to a folder."""
    if name is None:
        return None
    value = os.environ.get(name)
    if not value:
        raise UserError(f"environment variable {name} is not set", where="--root-var", hint=f"export {name}=/path/to/data")
    return name, Path(os.path.abspath(os.path.expanduser(value)))


def build_collection(
    found: Sequence[FoundDataset], out: Path, *, name: str, root_var: tuple[str, Path] | None = None
) -> dict[str, Any]:
    """The manifest of `found` (nnSSL's layout, validated by our model), image paths written for `out`.

    Errors (DataError, exit 2): a dataset without images (its first skipped file and reason in the
    message), two datasets with one key, two images with one id (`manifest.image_uid`: the id
    preprocessing names its files by; checked in one pass with a dict).
    """
    written = _PathWriter(Path(os.path.abspath(out)).parent, root_var)
    seen_keys: dict[str, str] = {}
    seen_ids: dict[str, Path] = {}
    datasets: dict[str, Any] = {}
    for ds in found:
        if ds.key in seen_keys:
            raise DataError(
                f"two datasets share the key {ds.key!r} ({seen_keys[ds.key]} and {ds.where})",
                where=ds.where,
                hint="rename one folder",
            )
        seen_keys[ds.key] = ds.where
        if not ds.images:
            why = f" ({len(ds.skipped)} skipped, e.g. {ds.skipped[0].path}: {ds.skipped[0].reason})" if ds.skipped else ""
            ignored = f"; ignored {', '.join(f'{n} {k}' for k, n in sorted(ds.ignored.items()))}" if ds.ignored else ""
            raise DataError(f"no image found{why}{ignored}", where=ds.where, hint="check the source options (see `data manifest --help`)")
        subjects: dict[str, Any] = {}
        for im in sorted(ds.images, key=lambda im: (im.subject, im.session, str(im.path))):
            uid = image_uid(name, ds.key, im.subject, im.session, im.path.name)
            if uid in seen_ids:
                raise DataError(
                    f"two images have the same identity {uid}: {seen_ids[uid]} and {im.path}",
                    where=ds.where,
                    hint="give them distinct subjects/sessions (e.g. a session group) or distinct file names",
                )
            seen_ids[uid] = im.path
            subject = subjects.setdefault(
                im.subject, {"subject_id": im.subject, "subject_info": ds.subject_info.get(im.subject) or None, "sessions": {}}
            )
            session = subject["sessions"].setdefault(
                im.session,
                {"session_id": im.session, "session_info": ds.session_info.get((im.subject, im.session)) or None, "images": []},
            )
            session["images"].append(
                {
                    "name": im.path.name,
                    "image_path": written(im.path),
                    "modality": im.modality,
                    "image_info": im.image_info,
                    "associated_masks": None,
                }
            )
        datasets[ds.key] = {"dataset_index": ds.key, "name": ds.name, "dataset_info": ds.info, "subjects": subjects}
    manifest = {"collection_index": 1, "collection_name": name, "datasets": datasets}
    Collection.model_validate(manifest)
    return manifest


def write_manifest(manifest: dict[str, Any], out: Path) -> Path:
    """Write the manifest as JSON via a temporary file and a rename."""
    write_atomic(Path(out), json.dumps(manifest, indent=2) + "\n")
    return Path(out)


@dataclass
class ManifestReport:
    """The written manifest and what each dataset contributed or left out."""

    path: Path
    datasets: list[FoundDataset]

    @property
    def skipped(self) -> list[Skipped]:
        return [s for ds in self.datasets for s in ds.skipped]


def make_manifest(
    roots: Sequence[Path],
    out: Path,
    *,
    suffixes: Sequence[str] | None = None,
    pattern: str | None = None,
    regex: str | None = None,
    modality: str | None = None,
    table: Path | None = None,
    columns: Sequence[str] = (),
    root_var: str | None = None,
    name: str | None = None,
) -> ManifestReport:
    """Scan the sources, check them, and write `out` (a folder: `out/pretrain_data.json`); nothing is written on an error.

    Sources: `table` (no ROOTs); else with `pattern` + `regex` every ROOT is a plain folder; else every
    ROOT must be a BIDS dataset (`suffixes` choose the images). `name`: the collection's name
    (default: the manifest folder's name). `root_var`: write paths as `$NAME/...` below that
    environment variable's folder instead of relative to the manifest's folder.
    """
    from ds_simclr.data.manifest_bids import is_bids, scan_bids
    from ds_simclr.data.manifest_files import compile_regex, parse_columns, scan_folder, scan_table

    variable = root_variable(root_var)
    folder_mode = pattern is not None or regex is not None
    if table is not None:
        if roots or folder_mode or suffixes:
            raise UserError("--table takes no ROOT, --pattern, --regex or --suffix", where="--table")
        found = scan_table(table, parse_columns(columns), modality)
    elif not roots:
        raise UserError("give at least one ROOT folder, or --table FILE", where="data manifest")
    elif folder_mode:
        if pattern is None or regex is None:
            raise UserError("a plain folder needs both --pattern and --regex", where="--pattern" if pattern is None else "--regex")
        if suffixes or columns:
            raise UserError("--suffix and --column apply to BIDS datasets and tables", where="--pattern")
        compiled = compile_regex(regex, modality)
        found = [scan_folder(root, pattern, compiled, modality) for root in roots]
    else:
        if columns or modality:
            raise UserError("--column and --modality apply to plain folders and tables", where="data manifest")
        for root in roots:
            if not is_bids(check_root(root)):
                raise DataError(
                    "not a BIDS dataset (no dataset_description.json)",
                    where=str(root),
                    hint="for a plain folder give --pattern and --regex",
                )
        found = [scan_bids(root, suffixes) for root in roots]
    out = Path(os.path.abspath(out))
    if out.is_dir():
        out = out / MANIFEST_NAME
    manifest = build_collection(found, out, name=name or out.parent.name or "collection", root_var=variable)
    try:
        return ManifestReport(write_manifest(manifest, out), found)
    except OSError as exc:
        raise DataError(f"cannot write the manifest: {exc.strerror or exc}", where=str(out)) from exc
