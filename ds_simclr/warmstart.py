"""A run's initial weights: the seeded initialisation, or an export given as `model.init_from`.

`model.init_from` names an nnSSL adaptation checkpoint (ours from `ds_simclr export`, or one nnSSL
wrote): its encoder, found by the plan's `key_to_stem` / `key_to_encoder` prefixes, must match the
run's encoder tensor for tensor (a run trains on single images: an export for more input channels
is refused); the projection head is taken too when the file has it with the same shapes, else it
keeps its seeded initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ds_simclr.errors import DataError
from ds_simclr.spec import RunSpec


def _read_export(path: Path, where: str) -> tuple[dict[str, torch.Tensor], dict]:
    if not path.is_file():
        raise DataError("file not found", where=where)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding more than tensors and plain types
        raise DataError(f"cannot read it as an export: {' '.join(str(exc).split())[:160]}", where=where) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise DataError("not an nnSSL adaptation checkpoint (no network_weights)", where=where,
                        hint="give a file written by `ds_simclr export` or by nnSSL")
    return checkpoint["network_weights"], checkpoint.get("nnssl_adaptation_plan") or {}


def warm_start(model: torch.nn.Module, path: Path, where: str) -> str:
    """Copy an export's encoder (and matching head) into `model`; returns what was taken, in words."""
    from ds_simclr.export import KEY_TO_ENCODER, KEY_TO_STEM

    weights, plan = _read_export(Path(path), f"{where}: {path}")
    prefixes = {plan.get("key_to_stem", KEY_TO_STEM): KEY_TO_STEM, plan.get("key_to_encoder", KEY_TO_ENCODER): KEY_TO_ENCODER}
    ours = model.state_dict()
    renamed = {}
    for key, value in weights.items():
        for theirs, mine in prefixes.items():
            if key.startswith(theirs + "."):
                renamed[mine + key[len(theirs):]] = value
    encoder_keys = [key for key in ours if key.startswith(("encoder.",))]
    head_keys = [key for key in ours if not key.startswith("encoder.")]
    state = dict(ours)
    for key in encoder_keys:
        if key not in renamed:
            raise DataError(f"the export has no {key}", where=f"{where}: {path}", hint="export and model.encoder must match")
        if renamed[key].shape != ours[key].shape:
            raise DataError(
                f"{key} has shape {tuple(renamed[key].shape)} in the export, the run's model wants {tuple(ours[key].shape)}",
                where=f"{where}: {path}", hint="export and model.encoder must match (1 input channel)",
            )
        state[key] = renamed[key]
    head = all(key in weights and weights[key].shape == ours[key].shape for key in head_keys)
    if head:
        state.update({key: weights[key] for key in head_keys})
    model.load_state_dict(state, strict=True)
    return f"encoder{' and projection head' if head else ''} from {path}"


def initial_model(spec: RunSpec, seed: int | None = None, warm: bool = True) -> tuple[torch.nn.Module, str]:
    """The model a run of `spec` starts from (fp32): seeded with `seed` (default `spec.seed`), then
    `model.init_from` when `warm`. Returns it and a few words on where its weights come from."""
    from ds_simclr.model import build_model

    torch.manual_seed(spec.seed if seed is None else seed)
    model = build_model(
        spec.model.encoder,
        in_channels=spec.model.in_channels,
        head_hidden=spec.model.head_hidden,
        head_out=spec.model.head_out,
        head_layers=spec.model.head_layers,
    )
    if warm and spec.model.init_from is not None:
        return model, warm_start(model, spec.model.init_from, spec.where("model.init_from"))
    return model, f"random initialisation, seed {spec.seed if seed is None else seed}"
