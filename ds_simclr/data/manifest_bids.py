"""A BIDS dataset as a manifest source, read by the BIDS schema's own file-name rules.

A ROOT holding `dataset_description.json` is one dataset: key = the folder's name (OpenNeuro's
`ds000001` habit, as in nnSSL's OpenMind manifest), name = the description's `Name`, dataset_info =
the description. Subject and session are the `sub-`/`ses-` entities (keys `sub-<label>`,
`ses-<label>`; no session -> `ses-DEFAULT`); the modality is the suffix (`T1w`, `FLAIR`, ...).

Which file is an image of which suffix is decided by the regular expressions that `bidsschematools`
generates from the schema's `rules.files.raw` (entity order and formats, folder levels, datatypes,
extensions of the BIDS version the installed schema describes). Default suffixes: the schema's
anatomical non-parametric group (`rules.files.raw.anat.nonparametric`). Left out: hidden paths, the
top-level `derivatives/`, `sourcedata/` and `code/` (not raw data), and paths `.bidsignore` names
(gitignore syntax, matched with `pathspec` as the BIDS validator does).

Metadata (BIDS "The Inheritance Principle"): every `[<entities>_]<suffix>.json` in the image's folder
or a folder above whose entities are a subset of the image's, applied from the top down so that the
nearest (then the most specific) wins -> `image_info`; `participants.tsv` rows -> `subject_info`;
`sub-<label>_sessions.tsv` rows -> `session_info`.

Why not pybids (0.22.0): measured on 100k generated files here, `BIDSLayout` indexing took 75 s
without metadata and `parse_file_entities` 3.6 ms per file, and neither reads `.bidsignore`
(benchmarks/manifest.py runs this module on the same tree in about 10 s).
"""

from __future__ import annotations

import csv
import difflib
import functools
import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ds_simclr.data.manifest_build import (
    BROKEN_LINK,
    DEFAULT_SESSION,
    FoundDataset,
    FoundImage,
    Skipped,
    cell_value,
    check_root,
)
from ds_simclr.errors import DataError, UserError

DESCRIPTION = "dataset_description.json"
NOT_RAW = ("derivatives", "sourcedata", "code")
"""Top-level folders that hold no raw data (BIDS "Storage of derived data", "Source vs. raw vs. derived data")."""
_NIFTI = ("nii", "nii.gz")
_Entities = dict[str, str]


@functools.cache
def _schema() -> Any:
    from bidsschematools.schema import load_schema

    return load_schema()


def schema_version() -> str:
    """The BIDS version of the installed schema (e.g. `1.11.2`)."""
    return str(_schema().bids_version)


def anatomical_suffixes() -> list[str]:
    """The default suffixes: the schema's anatomical non-parametric images (T1w, T2w, FLAIR, ...)."""
    return list(_schema().rules.files.raw.anat.nonparametric.suffixes)


def check_suffixes(suffixes: Sequence[str]) -> tuple[str, ...]:
    """The suffixes, each known to the schema's raw-data rules; UserError naming an unknown one."""
    known = {s for rule in _schema().rules.files.raw.values(level=2) for s in rule.get("suffixes", ())}
    for suffix in suffixes:
        if suffix not in known:
            close = [k for k in sorted(known) if k.lower() == suffix.lower()] or difflib.get_close_matches(suffix, sorted(known), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"anatomical suffixes: {', '.join(anatomical_suffixes())}"
            raise UserError(f"{suffix!r} is not a BIDS suffix (schema {schema_version()})", where="--suffix", hint=hint)
    return tuple(sorted(set(suffixes)))


@functools.cache
def _rules(suffixes: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    """Path regexes (relative to the dataset root) of the schema's raw-data rules, narrowed to `suffixes`.

    bidsschematools splits each rule into the data files and their sidecars (all entities optional,
    at any folder level), so one list matches both images and inheritable `.json` files.
    """
    from bidsschematools.rules import regexify_filename_rules
    from bidsschematools.types import Namespace

    schema = _schema()
    group = {}
    for key, rule in schema.rules.files.raw.items(level=2):
        chosen = [s for s in rule.get("suffixes", ()) if s in suffixes]
        if chosen:
            group[key.replace(".", "_")] = {**rule.to_dict(), "suffixes": chosen}
    return tuple(re.compile(r["regex"]) for r in regexify_filename_rules(Namespace.build(group), schema, level=1))


def _entities(rules: Sequence[re.Pattern[str]], path: str) -> _Entities | None:
    for rule in rules:
        match = rule.match(path)
        if match:
            return {k: v for k, v in match.groupdict().items() if v is not None and k != "extension"}
    return None


def is_bids(root: Path) -> bool:
    """True when `root` holds a `dataset_description.json`."""
    return (Path(root) / DESCRIPTION).is_file()


def _read_json(path: Path | str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not a readable JSON file: {exc}", where=str(path)) from exc
    if not isinstance(value, dict):
        raise DataError("not a JSON object", where=str(path))
    return value


def _bidsignore(root: Path) -> Any:
    path = root / ".bidsignore"
    if not path.is_file():
        return None
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(path.read_text(encoding="utf-8").splitlines())


def _tsv_rows(path: Path, id_column: str, found: FoundDataset) -> dict[str, dict[str, Any]]:
    """Rows of a BIDS TSV keyed by `id_column`, other cells as JSON values (`n/a` left out).

    An unreadable file or one without the id column is reported as skipped; its rows are left out.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            if id_column not in (reader.fieldnames or []):
                found.skipped.append(Skipped(path, f"no {id_column} column; its rows are left out"))
                return {}
            return {
                (row[id_column] or "").strip(): {
                    k: value for k, v in row.items() if k not in (id_column, None) and (value := cell_value(v or "")) is not None
                }
                for row in reader
            }
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        found.skipped.append(Skipped(path, f"not a readable TSV file ({exc}); its rows are left out"))
        return {}


class _Sidecars:
    """Inheritable JSON sidecars by (folder, suffix); each file read once."""

    def __init__(self, root: Path, found: FoundDataset) -> None:
        self.root, self.found = root, found
        self.by_folder: dict[tuple[str, str], list[tuple[_Entities, str]]] = defaultdict(list)
        self.cache: dict[str, dict[str, Any]] = {}

    def add(self, folder: str, entities: _Entities, path: str) -> None:
        self.by_folder[(folder, entities["suffix"])].append((entities, path))

    def _read(self, path: str) -> dict[str, Any]:
        if path not in self.cache:
            try:
                self.cache[path] = _read_json(os.path.join(self.root, path))
            except DataError as exc:
                self.found.skipped.append(Skipped(self.root / path, f"{exc.message}; its metadata is left out"))
                self.cache[path] = {}
        return self.cache[path]

    def metadata(self, path: str, entities: _Entities) -> dict[str, Any] | None:
        """The merged sidecars that apply to the image at `path` (None when there are none)."""
        parts = path.split("/")[:-1]
        merged: dict[str, Any] = {}
        for depth in range(len(parts) + 1):
            folder = "".join(p + "/" for p in parts[:depth])
            applicable = [
                (len(ents), side)
                for ents, side in self.by_folder.get((folder, entities["suffix"]), ())
                if all(entities.get(k) == v for k, v in ents.items() if k != "datatype")
            ]
            for _, side in sorted(applicable):
                merged.update(self._read(side))
        return merged or None


def scan_bids(root: Path, suffixes: Sequence[str] | None = None) -> FoundDataset:
    """The images of the chosen suffixes (default: `anatomical_suffixes()`) in one BIDS dataset."""
    root = check_root(Path(root))
    description = _read_json(root / DESCRIPTION)
    if description.get("DatasetType") == "derivative":
        raise DataError("a derivative dataset (DatasetType: derivative)", where=str(root / DESCRIPTION), hint="give the raw BIDS dataset")
    chosen = check_suffixes(suffixes) if suffixes else tuple(sorted(anatomical_suffixes()))
    rules = _rules(chosen)
    name = description.get("Name")
    found = FoundDataset(key=root.name, where=str(root), name=str(name) if name else None, info=description)
    ignore = _bidsignore(root)
    sidecars = _Sidecars(root, found)
    images: list[tuple[str, _Entities]] = []
    sessions_tsv: list[str] = []
    top = len(str(root)) + 1
    for folder, dirs, files in os.walk(root):
        prefix = folder[top:].replace(os.sep, "/") + "/" if len(folder) >= top else ""
        keep = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            if not prefix and d in NOT_RAW:
                found.ignored[f"{d}/ folder"] += 1
            elif ignore is not None and ignore.match_file(f"{prefix}{d}/"):
                found.ignored["paths in .bidsignore"] += 1
            else:
                keep.append(d)
        dirs[:] = keep
        for f in files:
            path = prefix + f
            if f.startswith(".") or f == DESCRIPTION:
                continue
            if ignore is not None and ignore.match_file(path):
                found.ignored["paths in .bidsignore"] += 1
                continue
            if f.endswith("_sessions.tsv") and prefix.count("/") == 1:
                sessions_tsv.append(path)
                continue
            stem, _, ext = f.partition(".")
            suffix = stem.rpartition("_")[2]
            if ext == "json" and suffix in chosen:
                entities = _entities(rules, path)
                if entities is not None:
                    sidecars.add(prefix, entities, path)
            elif ext in _NIFTI and suffix not in chosen:
                found.ignored[f"{suffix} images (not selected)"] += 1
            elif ext in _NIFTI:
                entities = _entities(rules, path)
                if entities is None:
                    reason = f"not a BIDS path for a {suffix} image (schema {schema_version()}): check its entities and folders"
                    found.skipped.append(Skipped(root / path, reason))
                elif not os.path.exists(os.path.join(folder, f)):
                    found.skipped.append(Skipped(root / path, BROKEN_LINK))
                else:
                    images.append((path, entities))
    if (root / "participants.tsv").is_file():
        found.subject_info = _tsv_rows(root / "participants.tsv", "participant_id", found)
    for path in sessions_tsv:
        subject = path.split("/")[0]
        for session, info in _tsv_rows(root / path, "session_id", found).items():
            found.session_info[(subject, session)] = info
    for path, entities in images:
        session = entities.get("session")
        found.images.append(
            FoundImage(
                subject=f"sub-{entities['subject']}",
                session=f"ses-{session}" if session else DEFAULT_SESSION,
                path=root / path,
                modality=entities["suffix"],
                image_info=sidecars.metadata(path, entities),
            )
        )
    return found
