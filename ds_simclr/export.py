"""Export a checkpoint for downstream fine-tuning: the file nnSSL's adaptation readers load.

A torch file holding
- `network_weights`: the fp32 state dict with nnSSL's key names, projection head included
  (downstream code takes the encoder by key). Keys that alias one parameter (nnSSL's conv blocks
  register each conv and norm twice, as `conv` and `all_modules.0`) share one tensor, exactly as
  `module.state_dict()` gives them, so `torch.save` stores each parameter once and readers that
  find aliases by storage (SSL3D classification's input-channel repeat) see them all.
- `nnssl_adaptation_plan`: nnSSL's AdaptationPlan fields (nnssl `adaptation_planning/
  adaptation_plan.py`): the architecture (the `ResEncL` preset, else a `ResidualEncoderUNet` with
  nnSSL's DynamicArchitecturePlans kwargs), where encoder, stem and input projection live in the
  state dict, the recommended patch size, input channels, and `pretrain_plan` in nnSSL's Plan layout
  (`experiment_planning/experiment_planners/plan.py`) with one configuration whose `spacing` is the
  store's and whose `patch_size` is the views' output size: nnU-Net's `preprocess_like_nnssl`
  reads both.
Only plain Python types and tensors, so it loads with `torch.load(..., weights_only=True)`.

ZeRO checkpoints keep the fp32 master weights in the optimizer shards; DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` reassembles them. BF16_Optimizer checkpoints (bf16 with ZeRO-1 and
fp32 gradient accumulation: `dsconfig.fp32_gradients`) keep them in another layout, which
DeepSpeed's universal-checkpoint converter reads.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from ds_simclr.atomic import atomic_path
from ds_simclr.errors import DataError
from ds_simclr.rundir import RunPaths
from ds_simclr.spec import RunSpec
from ds_simclr.specload import load_spec

NNSSL_ARCHITECTURE = {"resenc_l": "ResEncL"}
"""nnSSL preset names; the other encoders are described by DynamicArchitecturePlans kwargs."""
KEY_TO_ENCODER, KEY_TO_STEM = "encoder.stages", "encoder.stem"
KEYS_TO_IN_PROJ = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")


def architecture_plans(encoder: str) -> dict[str, Any]:
    """nnSSL's serialised ArchitecturePlans: a preset name, or d-n-a ResidualEncoderUNet kwargs."""
    from ds_simclr.architectures import encoder_arch

    if encoder in NNSSL_ARCHITECTURE:
        return {"arch_class_name": NNSSL_ARCHITECTURE[encoder], "arch_kwargs": None, "arch_kwargs_requiring_import": None}
    arch = encoder_arch(encoder)
    n, k = len(arch.features), arch.kernel_size
    return {
        "arch_class_name": "ResidualEncoderUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": list(arch.features),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[k, k, k]] * n,
            "strides": [[s, s, s] for s in arch.strides],
            "n_blocks_per_stage": list(arch.blocks),
            "n_conv_per_stage_decoder": [1] * (n - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.modules.activation.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"],
    }


def pretrain_plan(spec: RunSpec, store_plan: dict[str, Any], fingerprint: dict[str, Any], dataset: str) -> dict[str, Any]:
    """nnSSL's serialised Plan with the one configuration the run was pretrained with.

    store_plan: the store's plan.json (`target_spacing` in mm); fingerprint: its fingerprint.json
    (original spacings); dataset: a name for the pretraining data.
    """
    size = spec.views.output_size
    spacings = [entry["spacing"] for entry in fingerprint.values()] or [store_plan["target_spacing"]]
    name = "onemmiso" if [float(s) for s in store_plan["target_spacing"]] == [1.0, 1.0, 1.0] else "fixed"
    configuration = {
        "data_identifier": f"ds_simclr_{dataset}",
        "preprocessor_name": "ds_simclr.data.preprocess",
        "spacing_style": name,
        "normalization_schemes": ["ZScoreNormalization"] * spec.model.in_channels,
        "use_mask_for_norm": [True] * spec.model.in_channels,  # z-score over the anatomy mask or non-zero voxels
        "resampling_fn_data": "SimpleITK.Resample",
        "resampling_fn_data_kwargs": {"interpolator": store_plan["image_interpolation"], "order": 3},
        "resampling_fn_mask": "SimpleITK.Resample",
        "resampling_fn_mask_kwargs": {"interpolator": store_plan["mask_interpolation"], "order": 0},
        "spacing": [float(s) for s in store_plan["target_spacing"]],
        "patch_size": [size, size, size],
    }
    return {
        "dataset_name": dataset,
        "plans_name": "ds_simclrPlans",
        "original_median_spacing_after_transp": [float(statistics.median(axis)) for axis in zip(*spacings)],
        "image_reader_writer": "NibabelIOWithReorient",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {name: configuration},
        "experiment_planner_used": "ds_simclr.data.preprocess.Plan",
    }


def adaptation_plan(spec: RunSpec, plan: dict[str, Any]) -> dict[str, Any]:
    """nnSSL's serialised AdaptationPlan for a run of `spec` pretrained with `plan` (see `pretrain_plan`)."""
    size = spec.views.output_size
    return {
        "architecture_plans": architecture_plans(spec.model.encoder),
        "pretrain_plan": plan,
        "pretrain_num_input_channels": spec.model.in_channels,
        "recommended_downstream_patchsize": [size, size, size],
        "key_to_encoder": KEY_TO_ENCODER,
        "key_to_stem": KEY_TO_STEM,
        "keys_to_in_proj": list(KEYS_TO_IN_PROJ),
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


def load_with_aliases(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load weights that may name each shared parameter once (DeepSpeed does; nnSSL registers each
    conv and norm twice); the model's aliased keys then follow. Anything else missing is an error."""
    result = model.load_state_dict(weights, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[key]) for key in weights if key in params}
    missing = [key for key in result.missing_keys if id(params.get(key)) not in loaded]
    if result.unexpected_keys or missing:
        raise DataError(
            f"checkpoint does not match the run's model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})",
            where=where,
        )


def open_run(run_dir: Path, tag: str | None) -> tuple[RunPaths, RunSpec, str]:
    """A run directory's paths, its resolved spec and checkpoint `tag` (default: the latest).

    DataError when it is no run directory or has no such checkpoint (checked before the spec is read)."""
    paths = RunPaths(Path(run_dir))
    if not paths.spec.is_file():
        raise DataError("not a run directory (no spec.yaml)", where=str(run_dir))
    tag = tag or paths.latest_tag()
    if tag is None or not (paths.checkpoints / tag).is_dir():
        raise DataError(f"no checkpoint {tag or 'yet'}", where=str(paths.checkpoints), hint="train first, or name a --tag")
    return paths, load_spec(paths.spec), tag


def trained_model(paths: RunPaths, spec: RunSpec, tag: str) -> torch.nn.Module:
    """The run's model (fp32) holding the fp32 master weights of checkpoint `tag`."""
    from ds_simclr.model import build_model

    model = build_model(
        spec.model.encoder, spec.model.in_channels, spec.model.head_hidden, spec.model.head_out, spec.model.head_layers
    )
    load_with_aliases(model, _fp32_weights(paths, tag, spec.train.zero_stage), where=str(paths.checkpoints / tag))
    return model


def _store_files(spec: RunSpec) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The run's store plan.json and fingerprint.json, and a dataset name."""
    from ds_simclr.data.source import resolve_store

    store = resolve_store(spec.data)  # already finished for a trained run: returns at once
    if not (store / "plan.json").is_file():
        raise DataError("the run's store has no plan.json", where=str(store), hint="preprocess the data again")
    fingerprint = store / "fingerprint.json"
    return (
        json.loads((store / "plan.json").read_text()),
        json.loads(fingerprint.read_text()) if fingerprint.is_file() else {},
        "ds_simclr_demo" if spec.data.demo else store.name,
    )


def export_checkpoint(run_dir: Path, output: Path | None = None, tag: str | None = None) -> Path:
    """Write the adaptation checkpoint of `tag` (default: the latest) and return its path."""
    paths, spec, tag = open_run(run_dir, tag)
    model = trained_model(paths, spec, tag)
    weights = {key: value.detach() for key, value in model.state_dict().items()}  # aliases share storage
    store_plan, fingerprint, dataset = _store_files(spec)
    plan = adaptation_plan(spec, pretrain_plan(spec, store_plan, fingerprint, dataset))
    output = output or paths.root / "export" / f"nnssl_{tag}.pth"
    with atomic_path(output) as tmp:
        torch.save({"network_weights": weights, "nnssl_adaptation_plan": plan}, tmp)
    return output
