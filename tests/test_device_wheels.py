"""The GPU suite runs where only torch is installed, from the wheel folder scripts/device_wheels.sh builds.

A clean Python 3.11 virtualenv holds torch and its own requirements only (linked from this
checkout's .venv rather than unpacked again: the same files, in a second instead of two minutes);
the folder is installed with `pip install --no-index --no-deps --target`, as on the lent GPU
machine, and benchmarks/gpu_suite.py runs the real trainer on the CPU with a tiny encoder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path

import pytest
from helpers import REPO
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

CONFIGS = ["plain@2", "channels_last@2", "checkpointing@2"]


@pytest.fixture(scope="session")
def wheel_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheels") / "whl"
    t0 = time.perf_counter()
    subprocess.run(["scripts/device_wheels.sh", str(out)], cwd=REPO, check=True, capture_output=True, timeout=600)
    print(f"wheel folder built in {time.perf_counter() - t0:.1f} s")
    return out


def _closure(name: str) -> list[metadata.Distribution]:
    """`name` and everything it requires here (markers evaluated), as installed distributions."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [name]
    while todo:
        try:
            dist = metadata.distribution(todo.pop())
        except metadata.PackageNotFoundError:  # a requirement this platform does not install
            continue
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


@pytest.fixture(scope="session")
def torch_only_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv's python that can import torch (and its requirements) and nothing else of ours."""
    venv = tmp_path_factory.mktemp("venv") / "torch-only"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    here = Path(sysconfig.get_paths()["purelib"])
    for dist in _closure("torch"):
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith(("..", "__pycache__"))}:
            if (here / top).exists() and not (site / top).exists():
                (site / top).symlink_to(here / top)
    return venv / "bin" / "python"


def test_wheel_folder_is_complete_small_and_torch_free(wheel_folder: Path) -> None:
    wheels = sorted(p.name for p in wheel_folder.glob("*.whl"))
    size = sum(p.stat().st_size for p in wheel_folder.iterdir())
    assert size < 64 * 2**20, f"{size / 2**20:.1f} MiB"
    names = {w.split("-")[0].lower() for w in wheels}
    assert {"deepspeed", "ds_simclr", "pydantic", "pydantic_core", "numpy", "pyyaml"} <= names
    assert not any(n.startswith(("torch", "nvidia", "triton")) for n in names), names
    assert len({tuple(w.split("-")[:2]) for w in wheels}) == len(names), "one version of each"
    for binary in ("pydantic_core", "numpy", "pyyaml"):
        tags = {re.search(r"-(cp3\d+)-cp3\d+-manylinux", w).group(1) for w in wheels if w.lower().startswith(binary)}
        assert tags == {"cp311", "cp312"}, (binary, tags)
    assert next(w for w in wheels if w.startswith("deepspeed-")).endswith("-py3-none-any.whl")
    lines = (wheel_folder / "requirements.txt").read_text().split()
    assert len(lines) == len(names)


def test_gpu_suite_runs_from_the_wheels_where_only_torch_is(
    wheel_folder: Path, torch_only_python: Path, tmp_path: Path
) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OMP_NUM_THREADS": "2"}
    modules = ("torch", "numpy", "deepspeed", "pydantic", "ds_simclr")
    probe = f"import importlib.util as u; print([m for m in {modules} if u.find_spec(m)])"
    before = subprocess.run([torch_only_python, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert before.stdout.strip() == "['torch']", before.stdout
    site = tmp_path / "site"
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", site,
         "--find-links", wheel_folder, "-r", wheel_folder / "requirements.txt"],
        check=True, capture_output=True, timeout=300,
    )
    installed = time.perf_counter() - t0
    env["PYTHONPATH"] = str(site)
    cmd = [torch_only_python, REPO / "benchmarks" / "gpu_suite.py", "--device", "cpu", "--encoder", "resenc_tiny", "--size",
           "32", "--head", "32", "--warmup", "1", "--steps", "1", "--views-seconds", "0.5", "--configs", *CONFIGS]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    print(f"install {installed:.1f} s, suite {time.perf_counter() - t0 - installed:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    header, *runs, views, done = records
    assert header["torch"].startswith("2.13") and header["deepspeed"] == metadata.version("deepspeed")
    assert [(r["config"], r["micro_batch"]) for r in runs] == [(c.split("@")[0], 2) for c in CONFIGS]
    for run in runs:
        assert "error" not in run, run
        assert run["pairs_per_s"] > 0 and 0 <= run["data_wait_fraction"] < 1 and run["plan_estimate_gib"] > 0
        # same weights, same first batch: the same loss up to bf16 rounding of another memory layout
        assert run["first_loss"] == pytest.approx(runs[0]["first_loss"], rel=2e-3)
    assert views["views_per_s"] > 0 and done["suite"] == "done"
