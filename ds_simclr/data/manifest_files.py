"""Plain folders and tables of scans as manifest sources.

Folder: the files a glob finds under ROOT (`--pattern`, `**` recursive, hidden files left out), each
path relative to ROOT (`/` separators) searched with a regex whose named groups give `subject`
(required), `session` (optional, default `ses-DEFAULT`) and `modality` (or `--modality` for all).
The dataset key is the ROOT's folder name.

Table: a CSV (a `.tsv` file: tab-separated) with one image per row, columns `path`, `subject`,
`session` (optional), `modality` (unless `--modality`) and `dataset` (optional; default: the table's
file name without extension); other names via `--column ROLE=NAME`. Relative paths resolve against
the table's folder; the other columns of a row go into its `image_info`.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ds_simclr.data.manifest import IMAGE_EXTENSIONS
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

REGEX_GROUPS = ("subject", "session", "modality")
TABLE_ROLES = ("path", "subject", "session", "modality", "dataset")


def compile_regex(regex: str, modality: str | None) -> re.Pattern[str]:
    """The compiled `--regex`; UserError for bad syntax, no `subject` group, an unknown group, or no modality."""
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise UserError(f"not a valid regular expression: {exc}", where="--regex") from exc
    groups = set(pattern.groupindex)
    if "subject" not in groups:
        raise UserError("the regex has no subject group", where="--regex", hint=r"e.g. --regex 'sub-(?P<subject>[^/_]+)/'")
    unknown = sorted(groups - set(REGEX_GROUPS))
    if unknown:
        raise UserError(f"unknown group {', '.join(unknown)}", where="--regex", hint=f"named groups: {', '.join(REGEX_GROUPS)}")
    if "modality" not in groups and modality is None:
        raise UserError("the regex has no modality group and no --modality is given", where="--regex", hint="add (?P<modality>...) or --modality T1w")
    return pattern


def scan_folder(root: Path, pattern: str, regex: re.Pattern[str], modality: str | None = None) -> FoundDataset:
    """The files `pattern` finds under `root` whose relative path `regex` matches (see the module doc)."""
    root = check_root(Path(root))
    if os.path.isabs(pattern):
        raise UserError(f"{pattern} is absolute", where="--pattern", hint="give a glob relative to each ROOT, e.g. '**/*.nii.gz'")
    found = FoundDataset(key=root.name, where=str(root))
    for rel in sorted(glob.glob(pattern, root_dir=root, recursive=True)):
        path = root / rel
        if not path.exists():
            found.skipped.append(Skipped(path, BROKEN_LINK))
            continue
        if not path.is_file():
            continue
        if not rel.endswith(IMAGE_EXTENSIONS):
            found.skipped.append(Skipped(path, f"not an image file ({', '.join(IMAGE_EXTENSIONS)})"))
            continue
        match = regex.search(Path(rel).as_posix())
        if match is None:
            found.skipped.append(Skipped(path, "does not match --regex"))
            continue
        groups = match.groupdict()
        image_modality = groups.get("modality") or modality
        if not groups["subject"] or not image_modality:
            found.skipped.append(Skipped(path, f"--regex matched no {'subject' if not groups['subject'] else 'modality'}"))
            continue
        found.images.append(FoundImage(groups["subject"], groups.get("session") or DEFAULT_SESSION, path, image_modality))
    return found


def parse_columns(items: Sequence[str]) -> dict[str, str]:
    """`ROLE=NAME` options as {role: column name}; UserError for a bad item or an unknown role."""
    columns = {}
    for item in items:
        role, sep, name = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"{item!r} is not ROLE=NAME", where="--column", hint="e.g. --column path=image_file")
        if role not in TABLE_ROLES:
            raise UserError(f"unknown role {role!r}", where="--column", hint=f"roles: {', '.join(TABLE_ROLES)}")
        columns[role] = name.strip()
    return columns


def _read_table(table: Path) -> tuple[list[str], list[dict[str | None, str]]]:
    """Header and rows of a CSV (`.tsv`: tab-separated); DataError when missing or unreadable."""
    if not table.is_file():
        raise DataError("no such file", where=str(table), hint="give a CSV/TSV with path and subject columns")
    try:
        with open(table, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if table.suffix.lower() == ".tsv" else ",")
            return [h for h in reader.fieldnames or [] if h], list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"not a readable CSV/TSV file: {exc}", where=str(table)) from exc


def scan_table(table: Path, columns: Mapping[str, str] | None = None, modality: str | None = None) -> list[FoundDataset]:
    """One FoundDataset per `dataset` value of the table (see the module doc); rows in file order.

    Errors (DataError): no such file, no rows, a required or mapped column missing from the header, an
    empty path, subject or modality cell (named by file:line and column). A row whose file does not
    exist is skipped.
    """
    table = Path(table)
    columns = dict(columns or {})
    header, rows = _read_table(table)
    names = {role: columns.get(role, role) for role in TABLE_ROLES}
    required = ["path", "subject"] + ([] if modality else ["modality"]) + [r for r in ("session", "dataset") if r in columns]
    for role in required:
        if names[role] not in header:
            raise DataError(
                f"no {names[role]!r} column (columns: {', '.join(header) or 'none'})",
                where=f"{table}: header",
                hint=f"rename a column or map it: --column {role}=NAME" + (", or give --modality" if role == "modality" else ""),
            )
    if not rows:
        raise DataError("no rows", where=str(table), hint="one row per image below the header")
    used = {names[r] for r in TABLE_ROLES if names[r] in header}
    datasets: dict[str, FoundDataset] = {}
    for line, row in enumerate(rows, start=2):
        cells = {role: (row.get(names[role]) or "").strip() for role in TABLE_ROLES if names[role] in header}
        cells["modality"] = cells.get("modality") or modality or ""
        for role in ("path", "subject", "modality"):
            if not cells[role]:
                raise DataError("empty cell", where=f"{table}:{line}: {names[role]}", hint=f"every row needs a {role}")
        key = cells.get("dataset") or table.stem
        found = datasets.setdefault(key, FoundDataset(key=key, where=str(table) if key == table.stem else f"{table}: dataset {key}"))
        path = Path(cells["path"]).expanduser()
        path = Path(os.path.abspath(path if path.is_absolute() else table.parent / path))
        if not path.is_file():
            found.skipped.append(Skipped(path, f"file not found ({table.name} line {line})"))
            continue
        info = {k: value for k, v in row.items() if k and k not in used and (value := cell_value(v or "")) is not None}
        found.images.append(FoundImage(cells["subject"], cells.get("session") or DEFAULT_SESSION, path, cells["modality"], info or None))
    return list(datasets.values())
