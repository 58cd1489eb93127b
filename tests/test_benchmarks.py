"""The GPU benchmarks must run on a machine that has torch and nothing else of ours' dependencies.

Each `benchmarks/gpu_*.py` is imported (not run) in a fresh interpreter, which then must not have
loaded DeepSpeed, MONAI, pydantic, SimpleITK, nibabel or PyYAML; the step benchmark also runs one
tiny CPU step so its code path is exercised.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO

FORBIDDEN = ("deepspeed", "monai", "pydantic", "SimpleITK", "nibabel", "yaml", "wandb")


@pytest.mark.parametrize("script", sorted((REPO / "benchmarks").glob("gpu_*.py")), ids=lambda p: p.name)
def test_gpu_benchmark_imports_only_torch(script) -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('bench', {str(script)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        f"print('LOADED', sorted(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED []" in result.stdout


def test_gpu_step_benchmark_runs_a_tiny_cpu_step() -> None:
    cmd = [sys.executable, "benchmarks/gpu_step.py", "--device", "cpu", "--encoder", "resenc_tiny", "--size", "32",
           "--batch", "2", "--steps", "1", "--warmup", "1", "--head-hidden", "32", "--head-out", "16",
           "--variants", "baseline", "channels_last_3d"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "baseline" in result.stdout and "pairs/s" in result.stdout
