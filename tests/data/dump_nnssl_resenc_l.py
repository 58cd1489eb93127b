"""Regenerate resenc_l_state_dict.json from the real nnSSL + dynamic-network-architectures code.

Why: our own ResEnc modules must produce exactly the state-dict names and shapes nnSSL's SimCLR
trainer saves, so nnU-Net/nnSSL adaptation code loads our weights. This records the ground truth once;
tests compare against the JSON and need neither package.

Usage (not run by the tests):
    pip install --no-deps dynamic-network-architectures
    git clone https://github.com/MIC-DKFZ/nnssl /tmp/nnssl
    python tests/data/dump_nnssl_resenc_l.py /tmp/nnssl/src [COMMIT] > tests/data/resenc_l_state_dict.json

COMMIT labels the nnSSL version when the source is not a git checkout (e.g. a `git archive`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from importlib.metadata import version
from pathlib import Path

import torch


def _nnssl_modules(nnssl_src: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Import nnSSL's architecture registry and VoCo head without installing nnSSL or its deps.

    The only import they need beyond torch and d-n-a is a type annotation (ConfigurationPlan),
    so that one module is stubbed.
    """
    plan_stub = types.ModuleType("nnssl.experiment_planning.experiment_planners.plan")
    plan_stub.ConfigurationPlan = object
    sys.modules["nnssl.experiment_planning.experiment_planners.plan"] = plan_stub
    sys.path.insert(0, str(nnssl_src))
    from nnssl.architectures import architecture_registry, voco_architecture

    return architecture_registry, voco_architecture


def main(nnssl_src: Path, commit: str | None = None) -> None:
    registry, voco = _nnssl_modules(nnssl_src)
    # What SimCLRTrainer.build_architecture_and_adaptation_plan does: ResEncL, encoder only, VoCo head.
    encoder = registry.get_res_enc_l(1, 1, False).encoder
    model = voco.VoCoArchitecture(encoder, encoder.output_channels)
    state = model.state_dict()
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    head_params = sum(p.numel() for p in model.projector.parameters())
    if commit is None:
        try:
            commit = subprocess.run(
                ["git", "-C", str(nnssl_src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    record = {
        "source": "nnssl SimCLRTrainer: get_res_enc_l(1, 1).encoder wrapped in VoCoArchitecture",
        "nnssl_commit": commit,
        "dynamic_network_architectures": version("dynamic_network_architectures"),
        "torch": torch.__version__,
        "parameters": {
            "encoder": encoder_params,
            "projector": head_params,
            "total": encoder_params + head_params,
        },
        "state_dict": {name: list(t.shape) for name, t in state.items()},
    }
    sys.stdout.write(_format(record))


def _format(record: dict) -> str:
    """Indented JSON with one line per state-dict entry, so diffs show which key changed."""
    shapes = record.pop("state_dict")
    head = json.dumps(record, indent=1)[:-2]
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items()]
    return head + ',\n "state_dict": {\n' + ",\n".join(lines) + "\n }\n}\n"


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else None)
