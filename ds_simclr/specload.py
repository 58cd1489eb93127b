"""Reading a run spec: YAML text and `--set` overrides -> `RunSpec`, every error as one line.

PyYAML's safe loader with two rules so that a spec means what was written:
- a key given twice, at any depth, is an error naming both lines (PyYAML keeps the last silently);
- exponent numbers that YAML 1.1 leaves as text (`1e3`, `1.0e3`, `3e-4`) are numbers, as in YAML 1.2,
  so `max_steps: 1e3` is 1000 (integer fields take a number when it is whole).
YAML 1.1's other readings stay (`no`, `off`, `on`, `yes` are booleans, `2024-01-01` is a date), but a
type error on such a value says what YAML made of it and how to quote it. `--set key=value` values
go through the same loader and the same checks. Errors are `SpecError`s: `file:LINE: dotted.field:
message`. Relative paths resolve against the spec file's folder and `$VARS` expand.
"""

from __future__ import annotations

import datetime
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ds_simclr.errors import SpecError
from ds_simclr.spec import RunSpec
from ds_simclr.specbase import StrictModel

_EXPONENT_NUMBER = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_MERGE_TAG = "tag:yaml.org,2002:merge"
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads exponent numbers without a dot or sign as floats."""


class SpecDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes text SpecLoader would read as a number (e.g. a name `1e3`)."""


for _cls in (SpecLoader, SpecDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_NUMBER, list("-+.0123456789"))


@dataclass
class _Document:
    """A spec being read: its mapping, its YAML nodes (for line numbers) and each `--set` value's node."""

    path: Path
    raw: dict[str, Any]
    root: yaml.Node | None = None
    overrides: dict[str, yaml.Node | None] = field(default_factory=dict)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Read, override, validate and resolve a spec file. Raises `SpecError` with one line."""
    path = Path(path)
    raw, root = _parse(_read_text(path), where=str(path), prefix="")
    if raw is None:
        raise SpecError("the spec is empty", where=str(path), hint="see ds_configs/quickstart.yaml")
    if not isinstance(raw, dict):
        raise SpecError(f"the spec must be a mapping of sections, not a {type(raw).__name__}", where=str(path))
    doc = _Document(path, raw, root)
    for override in overrides or []:
        _apply_override(doc, override)
    raw.setdefault("name", path.stem)
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as exc:
        raise _spec_error(exc, doc) from None
    spec._source = str(path)
    return resolve_paths(spec, base_dir=path.resolve().parent)


def spec_from_mapping(raw: dict[str, Any], where: str = "<spec>") -> RunSpec:
    """Validate an in-memory mapping (a saved run spec, a test) with the same one-line errors."""
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as exc:
        raise _spec_error(exc, _Document(Path(where), raw)) from None
    spec._source = where
    return spec


def dump_spec(spec: RunSpec) -> str:
    """The resolved spec as YAML (what a run directory keeps as `spec.yaml`); `load_spec` reads it back equal."""
    return yaml.dump(spec.model_dump(mode="json"), Dumper=SpecDumper, sort_keys=False)


def resolve_paths(model: StrictModel, base_dir: Path) -> Any:
    """Expand `$VARS` and anchor relative paths at `base_dir` in every Path field, at any depth.

    Unset variables stay as written; the data commands check paths where data is used.
    """
    for field_name in type(model).model_fields:
        value = getattr(model, field_name)
        if isinstance(value, StrictModel):
            resolve_paths(value, base_dir)
        elif isinstance(value, Path):
            expanded = Path(os.path.expanduser(os.path.expandvars(str(value))))
            if not expanded.is_absolute() and not str(expanded).startswith("$"):
                expanded = base_dir / expanded
            setattr(model, field_name, expanded)
    return model


# --------------------------------------------------------------------------- YAML


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise SpecError("spec file not found", where=str(path))
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read the spec: {exc}", where=str(path)) from None


def _parse(text: str, where: str, prefix: str) -> tuple[Any, yaml.Node | None]:
    """YAML text -> (value, node), refusing duplicate keys. `prefix` is the dotted key of a `--set` value
    (its errors name that instead of a file line)."""
    loader = SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _refuse_duplicates(node, prefix.split(".") if prefix else [], where, set(), lines=not prefix)
        return loader.construct_document(node), node
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        place = f"{where}:{mark.line + 1}" if mark and not prefix else where
        problem = exc.problem or exc.context or "malformed YAML"
        if "could not determine a constructor" in str(exc):
            problem = "tags such as !!python/... are not allowed in a spec"
        raise SpecError(f"invalid YAML: {problem}", where=place) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"invalid YAML: {exc}", where=where) from None
    finally:
        loader.dispose()


def _refuse_duplicates(node: yaml.Node, loc: list[str], where: str, visited: set[int], *, lines: bool) -> None:
    """Raise a SpecError for the first mapping key given twice, at any depth (a key next to a merge key
    `<<` is no duplicate: it overrides the merged one, as YAML says)."""
    if id(node) in visited:  # an alias of a node already checked (or of itself)
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key, value in node.value:
            if key.tag == _MERGE_TAG:  # `<<: *base`: keys given next to it override, as YAML says
                _refuse_duplicates(value, loc, where, visited, lines=lines)
                continue
            if not isinstance(key, yaml.ScalarNode):
                continue
            line = key.start_mark.line + 1
            if key.value in first_line:
                dotted = ".".join([*loc, key.value])
                if lines:
                    earlier = first_line[key.value]
                    on = f"on lines {earlier} and {line}" if earlier != line else f"on line {line}"
                    raise SpecError(f"given twice, {on}; keep one", where=f"{where}:{line}: {dotted}")
                raise SpecError(f"{dotted} given twice in one --set value; keep one", where=where)
            first_line[key.value] = line
            _refuse_duplicates(value, [*loc, key.value], where, visited, lines=lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicates(item, [*loc, str(index)], where, visited, lines=lines)


def _apply_override(doc: _Document, override: str) -> None:
    """Apply one `--set dotted.key=value` to the raw mapping; the value is read as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not _KEY.fullmatch(key):
        raise SpecError(f"--set expects key=value with a dotted key, got {override!r}", where=str(doc.path))
    if key in doc.overrides:
        raise SpecError(f"--set {key} given twice; keep one", where=str(doc.path))
    value, node = _parse(text, where=f"{doc.path}: --set {key}", prefix=key) if text.strip() else (None, None)
    target = doc.raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: {part} is not a section", where=str(doc.path))
        target = child
    target[parts[-1]] = value
    doc.overrides[key] = node


# --------------------------------------------------------------------------- errors


def _spec_error(exc: ValidationError, doc: _Document) -> SpecError:
    """Turn the first pydantic error into one line: file:line: dotted.field: message."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [str(part) for part in first["loc"] if not str(part).startswith("function-after")]
    loc = [part for part in loc if part not in ("int", "literal['auto']", "constrained-int")]
    dotted = ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown key {loc[-1]!r}" + _did_you_mean(loc)
    elif first["type"] == "missing":
        message = "required field is missing"
    override = next((key for key in doc.overrides if dotted == key or dotted.startswith(key + ".")), None)
    below = next((key for key in doc.overrides if dotted and key.startswith(dotted + ".")), None)
    if override is None and below is not None and _section(loc) is None:  # `--set seed.x=1` made `seed` a mapping
        if first["type"] != "extra_forbidden":
            message = f"{dotted} is not a section ({message})"
        return SpecError(message, where=f"{doc.path}: --set {below}")
    if override is not None:
        node = _node_at(doc.overrides[override], loc[len(override.split(".")) :])[0]
        where = f"{doc.path}: --set {dotted}"
    else:
        node, line = _node_at(doc.root, loc)
        where = f"{doc.path}:{line}" if line else str(doc.path)
        where += f": {dotted}" if dotted else ""
    reading = _yaml_reading(node, first["input"], first["type"]) if node is not None else None
    if reading:
        message += f" ({reading})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return SpecError(message + more, where=where)


def _section(loc: list[str]) -> type[StrictModel] | None:
    """The model of the spec section at `loc` (the whole spec for []), None when `loc` is no section."""
    model: type[StrictModel] | None = RunSpec
    for part in loc:
        field_info = model.model_fields.get(part) if model else None
        annotation = field_info.annotation if field_info else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, StrictModel) else None
    return model


def _did_you_mean(loc: list[str]) -> str:
    model = _section(loc[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _node_at(node: yaml.Node | None, loc: list[str]) -> tuple[yaml.Node | None, int | None]:
    """The YAML node at `loc` (None when it is not in the YAML) and the 1-based line of the deepest
    node on `loc` that exists."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((kv for kv in reversed(node.value) if kv[0].value == part), None)
            if match is None:
                return None, line
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return None, line
    return node, line


_TEXT_ERRORS = {"string_type", "path_type", "literal_error", "enum"}
"""pydantic errors where text was expected: then a value YAML read as a number also gets explained."""


def _yaml_reading(node: yaml.Node, value: Any, error_type: str) -> str | None:
    """`YAML read `NO` as the boolean false; ...` when YAML's reading of an unquoted scalar explains
    the error, else None. For a list, the first item YAML read as a boolean, null or date."""
    if isinstance(node, yaml.SequenceNode) and isinstance(value, (list, tuple)):
        items = [(n, v) for n, v in zip(node.value, value) if v is None or isinstance(v, (bool, datetime.date))]
        node, value = items[0] if items else (node, value)
    if not isinstance(node, yaml.ScalarNode) or node.style is not None or isinstance(value, str):
        return None
    if isinstance(value, bool):
        reading = f"the boolean {str(value).lower()}"
    elif value is None:
        reading = "null (no value)"
    elif isinstance(value, datetime.date):
        reading = "a date"
    elif isinstance(value, (int, float)) and error_type in _TEXT_ERRORS:
        reading = f"the number {value!r}"
    else:
        return None
    written = f"`{node.value}`" if node.value else "an empty value"
    quote = f"; write '{node.value}' in quotes if you meant the text" if node.value and error_type in _TEXT_ERRORS else ""
    return f"YAML read {written} as {reading}{quote}"
