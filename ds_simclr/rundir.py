"""The run directory: its file names, its creation, and the rule for resuming into it.

`<output_dir>/<name>/` holds spec.yaml (resolved), ds_config.json, hostfile, metrics.jsonl,
checkpoints/ (see `checkpoint.py`), wandb/, plots/, environment.json (software, hosts, the store
and its identity), `lock` (the live job holding the directory, see `runlock.py`) and errors/ (the
one-line error of each rank that stopped on a user error, read by `launch`). A directory holding a
checkpoint is resumed; a changed spec is refused unless every change is one resuming allows
(`spec.RESUME_MUTABLE_FIELDS`). Files are replaced atomically (`atomic.write_atomic`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ds_simclr.atomic import write_atomic
from ds_simclr.checkpoint import read_latest, step_tags
from ds_simclr.errors import SpecError
from ds_simclr.spec import RESUME_MUTABLE_FIELDS, RunSpec
from ds_simclr.specload import dump_spec


@dataclass(frozen=True)
class RunPaths:
    """Every file and folder of one run directory."""

    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def ds_config(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def hostfile(self) -> Path:
        return self.root / "hostfile"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def errors(self) -> Path:
        return self.root / "errors"

    def latest_tag(self) -> str | None:
        """The tag `checkpoints/latest` names, if that checkpoint exists."""
        tag = read_latest(self.checkpoints)  # damaged bytes read as a name no folder has
        return tag if tag and (self.checkpoints / tag).is_dir() else None


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two spec dictionaries."""
    changes = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += changed_fields(a, b, dotted + ".")
        elif a != b:
            changes.append(dotted)
    return changes


def check_resumable(paths: RunPaths, spec: RunSpec) -> None:
    """Refuse to resume a checkpointed run with a spec that changed what resuming cannot change."""
    if not paths.spec.is_file() or not (step_tags(paths.checkpoints) or read_latest(paths.checkpoints)):
        return
    saved = yaml.safe_load(paths.spec.read_text()) or {}
    current = spec.model_dump(mode="json")
    refused = [
        field
        for field in changed_fields(saved, current)
        if not any(field == allowed or field.startswith(allowed + ".") for allowed in RESUME_MUTABLE_FIELDS)
    ]
    if refused:
        raise SpecError(
            f"{paths.root} holds a checkpoint of a run with a different spec (changed: {', '.join(refused)})",
            where=spec.where(refused[0]),
            hint="resume with the run's own spec.yaml, or choose another name/output_dir",
        )


def write_run_files(paths: RunPaths, spec: RunSpec, ds_config: dict[str, Any]) -> None:
    """Create the directory and write the resolved spec and the DeepSpeed JSON (rank 0 only)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.spec, dump_spec(spec))
    write_atomic(paths.ds_config, json.dumps(ds_config, indent=2) + "\n")
