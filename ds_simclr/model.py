"""ResEnc encoders and the SimCLR projection head, with nnSSL's state-dict names (torch only).

The encoder family is nnU-Net's residual encoder as nnSSL builds it for ResEnc-L
(dynamic-network-architectures `ResidualEncoder` with `BasicBlockD`, see nnssl
`architectures/architecture_registry.py::get_res_enc_l`): a stem of one 3x3x3 conv block, then
stages of ResNet-D basic blocks, the first block of each stage strided; 3x3x3 convs with bias,
InstanceNorm3d(eps 1e-5, affine), LeakyReLU(0.01). The modules here are our own but register
their submodules under the same names and in the same order, so `model.state_dict()` has exactly
nnSSL's keys (`encoder.stem.*`, `encoder.stages.*`, `projector.layer{k}.0.*`) and shapes, and
nnSSL/nnU-Net adaptation code loads our weights. d-n-a's conv blocks register each conv/norm twice
(as `conv`/`norm` and inside `all_modules`), so every parameter appears under two keys; we mirror that.

nnSSL's SimCLR head (nnssl `architectures/voco_architecture.py`) average-pools every stage's
output, concatenates them (1120 features for ResEnc-L) and applies Linear -> norm -> ReLU twice,
then a Linear. Its norm is `InstanceNorm1d(affine=False)` applied to a (B, H) tensor, which torch
treats as one unbatched (C=B, L=H) sample: each row is normalised over its H features, i.e. a
LayerNorm without affine parameters. We write it as that LayerNorm (same numbers, no warning).

Speed options (`configure_speed`, the spec's `train.activation_checkpointing`, `train.channels_last`,
`train.compile`) change how the same function is computed, never the function or the names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ds_simclr.architectures import ENCODER_NAMES, ENCODERS, EncoderArch, check_input_shape, encoder_arch

__all__ = [
    "ENCODERS",
    "ENCODER_NAMES",
    "EncoderArch",
    "SimCLRModel",
    "build_model",
    "check_input_shape",
    "configure_speed",
    "count_parameters",
    "encoder_arch",
    "encoder_feature_dim",
]


def encoder_feature_dim(name: str) -> int:
    """Input width of the projection head for encoder `name` (1120 for resenc_l)."""
    return encoder_arch(name).feature_dim


def _is_channels_last(x: torch.Tensor) -> bool:
    """True for a 5-D tensor stored NDHWC (and not also NCDHW, as when C or X*Y*Z is 1)."""
    return x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


class _InstanceNormChannelsLast(torch.autograd.Function):
    """Instance norm of an NDHWC tensor whose output and input gradient stay NDHWC.

    torch's instance_norm (and group_norm on CUDA) copies a channels_last_3d input to NCDHW, so
    every convolution after a norm would get NCDHW again. Here the statistics are reductions over
    X, Y, Z and the rest are fused multiply-adds, computed in float32 for bf16/fp16 inputs (as
    torch's CUDA kernel does) and in float64 for fp32 ones (as its CPU kernel does: the input
    gradient's per-channel sums cancel heavily), written in the input's dtype and layout; the
    variance is torch's Welford in the input dtype. Saves x_hat (the normalised input: one tensor
    of the input's size, as the native kernel saves its input). Backward (Ioffe & Szegedy 2015,
    per sample and channel): dx = rstd * w * (dy - mean(dy) - x_hat * mean(dy * x_hat)).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> torch.Tensor:
        dims, stats = (2, 3, 4), torch.float32 if x.element_size() < 4 else torch.float64
        mean = x.mean(dims, keepdim=True, dtype=stats)  # (B, C, 1, 1, 1)
        var = torch.var_mean(x, dims, correction=0, keepdim=True)[0].to(stats)  # (B, C, 1, 1, 1)
        rstd = (var + eps).rsqrt()  # (B, C, 1, 1, 1)
        x_hat = torch.addcmul(-mean * rstd, x, rstd, out=torch.empty_like(x))  # (B, C, X, Y, Z), NDHWC
        w, b = (p.to(stats).view(1, -1, 1, 1, 1) for p in (weight, bias))  # (1, C, 1, 1, 1)
        ctx.save_for_backward(x_hat, rstd, w)
        ctx.param_dtype = weight.dtype
        return torch.addcmul(b, x_hat, w, out=torch.empty_like(x))  # (B, C, X, Y, Z), NDHWC

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x_hat, rstd, w = ctx.saved_tensors
        dims, m = (2, 3, 4), x_hat[0, 0].numel()
        sum_dy = grad.sum(dims, keepdim=True, dtype=rstd.dtype)  # (B, C, 1, 1, 1)
        sum_dy_xhat = (grad * x_hat).sum(dims, keepdim=True, dtype=rstd.dtype)  # (B, C, 1, 1, 1)
        a = rstd * w  # (B, C, 1, 1, 1)
        grad_x = torch.addcmul(-a * sum_dy / m, grad, a, out=torch.empty_like(x_hat))  # a (dy - mean dy)
        grad_x.addcmul_(x_hat, -a * sum_dy_xhat / m)  # (B, C, X, Y, Z), NDHWC
        grad_w = sum_dy_xhat.sum(0).flatten().to(ctx.param_dtype)  # (C,)
        grad_b = sum_dy.sum(0).flatten().to(ctx.param_dtype)  # (C,)
        return grad_x, grad_w, grad_b, None


class InstanceNorm3d(nn.InstanceNorm3d):
    """nn.InstanceNorm3d (same parameters and state-dict names) that keeps a channels_last_3d input so.

    NCDHW inputs, and any input while torch.compile traces (Inductor fuses the norm in the layout
    it picks), take torch's own kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_channels_last(x) and self.affine and not torch.compiler.is_compiling():
            return _InstanceNormChannelsLast.apply(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class ConvNormAct(nn.Module):
    """Conv -> InstanceNorm -> optional LeakyReLU, registered like d-n-a's `ConvDropoutNormReLU`."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, bias: bool, act: bool) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=bias)
        self.norm = InstanceNorm3d(c_out, eps=1e-5, affine=True)
        ops: list[nn.Module] = [self.conv, self.norm]
        if act:
            self.nonlin = nn.LeakyReLU(inplace=True)
            ops.append(self.nonlin)
        self.all_modules = nn.Sequential(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class Stem(nn.Module):
    """One full-resolution conv block to the first stage's width (no stride)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvNormAct(c_in, c_out, kernel_size, 1, bias=True, act=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class AvgPoolSkip(nn.Module):
    """Non-overlapping average pooling for the ResNet-D skip (no parameters, like nn.AvgPool3d).

    Why not nn.AvgPool3d: torch's CPU kernel has no bfloat16/float16 version, and DeepSpeed bf16
    casts the module, so CPU runs would fail. There we pool in float32 and cast back.
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            out = F.avg_pool3d(x.float(), self.stride, self.stride).to(x.dtype)
        else:
            out = F.avg_pool3d(x, self.stride, self.stride)
        if _is_channels_last(x):  # torch's CPU kernel returns NCDHW; the 1x1 conv after it should not
            out = out.contiguous(memory_format=torch.channels_last_3d)
        return out


class BasicBlockD(nn.Module):
    """ResNet-D basic block (He et al., "Bag of Tricks", 2019): the skip average-pools, then 1x1-projects."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(c_in, c_out, kernel_size, stride, bias=True, act=True)
        self.conv2 = ConvNormAct(c_out, c_out, kernel_size, 1, bias=True, act=False)
        self.nonlin2 = nn.LeakyReLU(inplace=True)
        skip: list[nn.Module] = []
        if stride != 1:
            skip.append(AvgPoolSkip(stride))
        if c_in != c_out:
            skip.append(ConvNormAct(c_in, c_out, 1, 1, bias=False, act=False))
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out += self.skip(x)
        return self.nonlin2(out)


class Stage(nn.Module):
    """`n_blocks` basic blocks; only the first changes width and resolution."""

    def __init__(self, n_blocks: int, c_in: int, c_out: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            BasicBlockD(c_in, c_out, kernel_size, stride),
            *[BasicBlockD(c_out, c_out, kernel_size, 1) for _ in range(n_blocks - 1)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResidualEncoder(nn.Module):
    """Stem + stages; returns every stage's output (shallow to deep), as nnSSL's encoder does.

    With `activation_checkpointing`, the stem and each stage keep only their input for backward
    and run their forward again there (torch.utils.checkpoint, non-reentrant), whenever autograd
    is recording.
    """

    def __init__(self, arch: EncoderArch, in_channels: int) -> None:
        super().__init__()
        self.activation_checkpointing = False
        k = arch.kernel_size
        self.stem = Stem(in_channels, arch.features[0], k)
        widths_in = (arch.features[0], *arch.features[:-1])
        self.stages = nn.Sequential(
            *[
                Stage(b, c_in, c_out, k, s)
                for b, c_in, c_out, s in zip(arch.blocks, widths_in, arch.features, arch.strides)
            ]
        )

    def _run(self, part: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(part, x, use_reentrant=False)
        return part(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self._run(self.stem, x)  # (B, F0, X, Y, Z)
        outputs = []
        for stage in self.stages:
            x = self._run(stage, x)  # (B, F_s, X / stride_s, ...)
            outputs.append(x)
        return outputs


class ProjectionHead(nn.Module):
    """MLP `layer1 ... layerL`: (Linear -> per-sample norm -> ReLU) x (L - 1), then Linear."""

    def __init__(self, in_features: int, hidden: int, out_features: int, layers: int) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"head_layers must be >= 1, got {layers}")
        widths = [in_features] + [hidden] * (layers - 1) + [out_features]
        for k in range(layers):
            last = k == layers - 1
            ops: list[nn.Module] = [nn.Linear(widths[k], widths[k + 1])]
            if not last:
                ops += [nn.LayerNorm(widths[k + 1], eps=1e-5, elementwise_affine=False), nn.ReLU(inplace=True)]
            self.add_module(f"layer{k + 1}", nn.Sequential(*ops))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)  # (B, width_k)
        return x


class SimCLRModel(nn.Module):
    """Encoder -> every stage globally average-pooled and concatenated -> projection head."""

    def __init__(self, encoder_name: str, in_channels: int, head_hidden: int, head_out: int, head_layers: int) -> None:
        super().__init__()
        arch = encoder_arch(encoder_name)
        self.encoder_name = encoder_name
        self.in_channels = in_channels
        self.channels_last = False
        self.encoder = ResidualEncoder(arch, in_channels)
        self.projector = ProjectionHead(arch.feature_dim, head_hidden, head_out, head_layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled multi-stage representation (B, feature_dim), what a linear probe would read."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, X, Y, Z), got shape {tuple(x.shape)}"
            )
        check_input_shape(self.encoder_name, tuple(x.shape[2:]))
        if self.channels_last and not _is_channels_last(x):
            # (B, C, X, Y, Z) stored NDHWC; a copy with NDHWC strides also for C = 1, where
            # `contiguous` keeps NCDHW strides and the convolutions would stay NCDHW
            x = torch.empty_like(x, memory_format=torch.channels_last_3d).copy_(x)
        stages = self.encoder(x)  # [(B, F_s, ...)] per stage
        return torch.cat([s.mean(dim=(2, 3, 4)) for s in stages], dim=1)  # (B, sum F_s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) views -> (B, head_out) projections, in the module's dtype."""
        return self.projector(self.features(x))  # (B, head_out)


def build_model(
    encoder: str, in_channels: int = 1, head_hidden: int = 2048, head_out: int = 2048, head_layers: int = 3
) -> SimCLRModel:
    """A SimCLR model: ResEnc `encoder` plus nnSSL's projection head layout.

    Defaults give nnSSL's SimCLR network (1120 -> 2048 -> 2048 -> 2048 for resenc_l) with its
    state-dict keys. Parameters keep torch's default initialisation, as in nnSSL's SimCLR trainer.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    return SimCLRModel(encoder, in_channels, head_hidden, head_out, head_layers)


def configure_speed(
    model: SimCLRModel, *, activation_checkpointing: bool = False, channels_last: bool = False, compile: bool = False
) -> SimCLRModel:
    """Switch on the spec's speed options in place (same function, same parameters and names).

    - `activation_checkpointing`: the encoder recomputes each stage in backward (see ResidualEncoder).
    - `channels_last`: the views enter the encoder in channels_last_3d (NDHWC) and every activation
      stays so (convolutions follow their input's layout; the norms keep it). The weights keep
      torch's default layout: DeepSpeed broadcasts and flattens parameters as contiguous tensors.
    - `compile`: `torch.compile` of the encoder in place (`nn.Module.compile`), so the state-dict keys
      stay nnSSL's. Compiles on the first forward of each shape (minutes for ResEnc-L).
    Call before handing the model to DeepSpeed. Returns `model`.
    """
    model.encoder.activation_checkpointing = activation_checkpointing
    model.channels_last = channels_last
    if compile:
        model.encoder.compile()
    return model


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Distinct parameters (shared tensors counted once, unlike state-dict entries)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
