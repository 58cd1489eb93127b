"""The torch-only GPU benchmarks must run on a machine that has torch and nothing else of ours.

`benchmarks/gpu_views.py` is imported (not run) in a fresh interpreter, which then must not have
loaded DeepSpeed, MONAI, pydantic, SimpleITK, nibabel or PyYAML. (`benchmarks/gpu_suite.py` runs the
real trainer, so it needs the wheel folder: tests/test_device_wheels.py.)
"""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO

FORBIDDEN = ("deepspeed", "monai", "pydantic", "SimpleITK", "nibabel", "yaml", "wandb")


def test_gpu_views_benchmark_imports_only_torch() -> None:
    script = REPO / "benchmarks" / "gpu_views.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('bench', {str(script)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        f"print('LOADED', sorted(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED []" in result.stdout
