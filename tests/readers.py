"""The downstream readers' loading rules, written from their documented behaviour, for tests.

- nnU-Net's nnSSL fine-tuning loader (the `nnssl_finetuning_inclusion` branch of TaWald/nnUNet,
  `nnunetv2/run/verify_checkpoint.py::load_pretrained_weights`): reads `network_weights` and the
  adaptation plan with `weights_only=True`; takes the keys under `key_to_encoder` and under
  `key_to_stem`, repeats the first `keys_to_in_proj` weight over the downstream input channels
  (divided by their number) for every in-projection key, strips the prefixes and loads encoder
  stages and stem into the network's own submodules with strict `load_state_dict`.
- SSL3D classification (`models/resenc.py::load_pretrained_weights`): repeats the stem's
  `all_modules.0.weight` for more input channels and puts the repeat under every key whose tensor
  shares its storage; then keeps every pretrained key the network has (outside the decoder),
  asserting equal shapes, and loads the network's completed state dict.
Both build d-n-a's ResidualEncoderUNet; `network_from_plan` does it from the export's plan as
nnSSL's `get_network_from_plans` does (class and kwargs located by dotted name).
"""

from __future__ import annotations

import pydoc
from pathlib import Path

import torch


def network_from_plan(plan: dict, input_channels: int, num_classes: int = 2) -> torch.nn.Module:
    """d-n-a network described by an adaptation plan's `architecture_plans` (ResEncL: nnSSL's preset)."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    arch = plan["architecture_plans"]
    if arch["arch_class_name"] == "ResEncL":
        kwargs = {
            "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": torch.nn.Conv3d,
            "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
            "n_blocks_per_stage": [1, 3, 4, 6, 6, 6], "n_conv_per_stage_decoder": [1] * 5, "conv_bias": True,
            "norm_op": torch.nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "nonlin": torch.nn.LeakyReLU, "nonlin_kwargs": {"inplace": True},
        }
        return ResidualEncoderUNet(input_channels=input_channels, num_classes=num_classes, **kwargs)
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["arch_kwargs_requiring_import"]:
        kwargs[key] = pydoc.locate(kwargs[key])
    cls = pydoc.locate(arch["arch_class_name"]) or ResidualEncoderUNet  # nnSSL falls back to d-n-a's class
    return cls(input_channels=input_channels, num_classes=num_classes, deep_supervision=False, **kwargs)


def nnunet_load(network: torch.nn.Module, path: Path, input_channels: int) -> None:
    """nnU-Net's rules: per-submodule strict loads of encoder stages and stem, prefixes stripped."""
    checkpoint = torch.load(path, weights_only=True)
    weights, plan = checkpoint["network_weights"], checkpoint["nnssl_adaptation_plan"]
    encoder_key, stem_key = plan["key_to_encoder"], plan["key_to_stem"]
    assert stem_key not in weights  # the stem lives apart from the encoder stages
    encoder = {k: v for k, v in weights.items() if k.startswith(encoder_key)}
    stem = {k: v for k, v in weights.items() if k.startswith(stem_key)}
    if input_channels > plan["pretrain_num_input_channels"]:
        source = stem[plan["keys_to_in_proj"][0] + ".weight"]
        repeated = source.repeat(1, input_channels, 1, 1, 1) / input_channels
        for key in plan["keys_to_in_proj"]:
            stem[key + ".weight"] = repeated

    def strip(prefix: str, part: dict) -> dict:
        return {k[len(prefix):].lstrip("."): v for k, v in part.items()}

    network.get_submodule(network.key_to_encoder).load_state_dict(strip(encoder_key, encoder))
    network.get_submodule(network.key_to_stem).load_state_dict(strip(stem_key, stem))


def classification_load(network: torch.nn.Module, path: Path) -> None:
    """SSL3D classification's rules: non-strict by name, the input projection found by storage."""
    weights = dict(torch.load(path, weights_only=True)["network_weights"])
    own = network.state_dict()
    in_key = "encoder.stem.convs.0.all_modules.0.weight"
    channels, pretrained_channels = own[in_key].shape[1], weights[in_key].shape[1]
    if channels != pretrained_channels:
        assert pretrained_channels == 1
        repeated = weights[in_key].repeat(1, channels, 1, 1, 1) / channels
        pointer = weights[in_key].data_ptr()
        for key in [k for k, v in weights.items() if v.data_ptr() == pointer]:
            weights[key] = repeated
    taken = {}
    for key, value in weights.items():
        if key in own and not any(skip in key for skip in (".seg_layers.", "decoder.stages", "decoder.transpconvs")):
            assert own[key].shape == value.shape, f"shape of {key}: {tuple(value.shape)} vs {tuple(own[key].shape)}"
            taken[key] = value
    own.update(taken)
    network.load_state_dict(own)
