"""Export a checkpoint for downstream fine-tuning: the file nnSSL's adaptation code reads.

A torch file holding `network_weights` (a plain fp32 state dict with nnSSL's key names, projection
head included: downstream code matches keys by name and takes the encoder) and
`nnssl_adaptation_plan` (nnSSL's AdaptationPlan fields: architecture, where the encoder and stem
live in the state dict, the input projection keys, the recommended patch size, input channels).
Only plain Python types and tensors, so it loads with `torch.load(..., weights_only=True)`.

ZeRO checkpoints keep the fp32 master weights in the optimizer shards; DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` reassembles them. BF16_Optimizer checkpoints (bf16 with ZeRO-1 and
fp32 gradient accumulation: `dsconfig.fp32_gradients`) keep them in another layout, which
DeepSpeed's universal-checkpoint converter reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ds_simclr.errors import DataError
from ds_simclr.rundir import RunPaths
from ds_simclr.spec import RunSpec
from ds_simclr.specload import load_spec

NNSSL_ARCHITECTURE = {"resenc_l": "ResEncL"}
"""nnSSL preset names; the smaller ds_simclr encoders have none and carry their own kwargs."""


def adaptation_plan(spec: RunSpec, pretrain_plan: dict[str, Any] | None) -> dict[str, Any]:
    """nnSSL's AdaptationPlan, serialised, for a run of `spec`."""
    from ds_simclr.architectures import ENCODERS

    name = spec.model.encoder
    arch = ENCODERS[name]
    size = spec.views.output_size
    return {
        "architecture_plans": {
            "arch_class_name": NNSSL_ARCHITECTURE.get(name, f"ds_simclr.{name}"),
            "arch_kwargs": None
            if name in NNSSL_ARCHITECTURE
            else {"features_per_stage": list(arch.features), "n_blocks_per_stage": list(arch.blocks),
                  "strides": list(arch.strides), "kernel_sizes": arch.kernel_size},
            "arch_kwargs_requiring_import": None,
        },
        "pretrain_plan": pretrain_plan,
        "recommended_downstream_patchsize": [size, size, size],
        "pretrain_num_input_channels": spec.model.in_channels,
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
        "key_to_lpe": None,
    }


def _fp32_weights(paths: RunPaths, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    checkpoint = paths.checkpoints / tag
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    if zero_stage == 0:
        return {k: v.float() for k, v in states["module"].items()}
    if _bf16_optimizer(states.get("ds_config") or {}):
        return _fp32_weights_via_universal(checkpoint, aliases=set(states.get("shared_params") or {}))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(paths.checkpoints), tag=tag)


def _bf16_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether DeepSpeed trained with its BF16_Optimizer (bf16, ZeRO-1, fp32 gradient accumulation:
    `dsconfig.fp32_gradients`), whose optimizer shards `zero_to_fp32` refuses ("not a zero checkpoint")."""
    return (
        bool(ds_config.get("bf16", {}).get("enabled"))
        and ds_config.get("zero_optimization", {}).get("stage") == 1
        and ds_config.get("data_types", {}).get("grad_accum_dtype") == "fp32"
    )


def _fp32_weights_via_universal(checkpoint: Path, aliases: set[str]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a BF16_Optimizer checkpoint, by DeepSpeed's universal-checkpoint
    converter (`ds_to_universal`, into a temporary folder): one `zero/<parameter>/fp32.pt` each.

    aliases: the checkpoint's `shared_params` names (a second name of a parameter), left out: the
    converter writes them from the bf16 module weights, not from the fp32 masters."""
    import tempfile

    from ds_simclr.checkpoint import convert_to_universal

    with tempfile.TemporaryDirectory(prefix="ds_simclr_export_") as tmp:
        universal = Path(tmp) / "universal"
        failure = convert_to_universal(checkpoint, universal)
        if failure is not None:
            raise DataError(f"DeepSpeed could not convert it: {failure}", where=str(checkpoint))
        return {
            folder.name: torch.load(folder / "fp32.pt", map_location="cpu", weights_only=False)["param"]
            for folder in sorted((universal / "zero").iterdir())
            if (folder / "fp32.pt").is_file() and folder.name not in aliases
        }


def _load_with_aliases(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load DeepSpeed's weights, which name each shared parameter once (nnSSL registers each conv and
    norm twice); the state dict then has every aliased key. Anything else missing is an error."""
    result = model.load_state_dict(weights, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[key]) for key in weights if key in params}
    missing = [key for key in result.missing_keys if id(params.get(key)) not in loaded]
    if result.unexpected_keys or missing:
        raise DataError(
            f"checkpoint does not match the run's model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})",
            where=where,
        )


def export_checkpoint(run_dir: Path, output: Path | None = None, tag: str | None = None) -> Path:
    """Write the adaptation checkpoint of `tag` (default: the latest) and return its path."""
    from ds_simclr.model import build_model

    paths = RunPaths(Path(run_dir))
    if not paths.spec.is_file():
        raise DataError("not a run directory (no spec.yaml)", where=str(run_dir))
    tag = tag or paths.latest_tag()
    if tag is None or not (paths.checkpoints / tag).is_dir():
        raise DataError(f"no checkpoint {tag or 'yet'}", where=str(paths.checkpoints), hint="train first, or name a --tag")
    spec = load_spec(paths.spec)
    model = build_model(
        spec.model.encoder, spec.model.in_channels, spec.model.head_hidden, spec.model.head_out, spec.model.head_layers
    )
    _load_with_aliases(model, _fp32_weights(paths, tag, spec.train.zero_stage), where=str(paths.checkpoints / tag))
    weights = {key: value.detach().float().contiguous().clone() for key, value in model.state_dict().items()}
    plan_file = Path(spec.data.store or "") / "plan.json"
    pretrain_plan = json.loads(plan_file.read_text()) if spec.data.store and plan_file.is_file() else None
    output = output or paths.root / "export" / f"nnssl_{tag}.pth"
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": weights, "nnssl_adaptation_plan": adaptation_plan(spec, pretrain_plan)}, output)
    return output
