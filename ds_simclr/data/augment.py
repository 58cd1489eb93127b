"""Apply drawn view parameters to a batch of patches on the training device (torch only).

Two spatial paths give the same views up to interpolation error:
- `fused` (GPU): crop, resize, flip and rotation composed into one affine, one `affine_grid` and one
  `grid_sample` per batch, sampling the patch once.
- `cpu`: crop by slicing, `interpolate` to the output size (~10x cheaper than a 3D grid_sample on a
  CPU), flip, and a rotation only when one is drawn (as a 2D rotation of slices when about one axis).
Both follow MONAI's semantics: Resize (trilinear, align_corners=False), Rotate about the view centre
with border padding. Intensity steps follow in the recipe's order and are batched on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from ds_simclr.data.params import ViewParams, bias_terms
from ds_simclr.data.recipe import ViewRecipe

SpatialPath = Literal["fused", "cpu"]
_EPS = 1e-7


def rotation_matrix(angles: Sequence[float]) -> torch.Tensor:
    """3x3 rotation in array-axis order: about axis 0, then 1, then 2 (MONAI's legacy "XYZ")."""
    a, b, c = (float(x) for x in angles)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]], dtype=torch.float64)
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]], dtype=torch.float64)
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]], dtype=torch.float64)
    return rx @ ry @ rz


def _view_affine(p: ViewParams, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output voxel o -> patch voxel i = A o + b (before clamping to the crop), float64."""
    centre = (out - 1) / 2.0
    rot = rotation_matrix(p.angles)
    a = rot.clone()
    b = centre - rot @ torch.full((3,), centre, dtype=torch.float64)
    for axis in range(3):
        if p.flip[axis]:
            a[axis] = -a[axis]
            b[axis] = out - 1 - b[axis]
    scale = torch.tensor([s / out for s in p.crop_size], dtype=torch.float64)
    a = scale[:, None] * a
    b = scale * b + 0.5 * scale - 0.5 + torch.tensor(p.crop_start, dtype=torch.float64)
    return a, b


def fused_spatial(patches: torch.Tensor, params: Sequence[ViewParams], out: int) -> torch.Tensor:
    """(n,1,P,P,P) -> (n,1,out^3): one grid_sample for crop + resize + flip + rotation."""
    n, patch = patches.shape[0], patches.shape[-1]
    thetas, lows, highs = [], [], []
    for p in params:
        a, b = _view_affine(p, out)
        # to normalised coordinates (align_corners=False): u = (2i + 1)/N - 1, axes reversed (x = W)
        s_in, s_out = 2.0 / patch, out / 2.0
        a_n = s_in * a * s_out
        b_n = s_in * (a @ torch.full((3,), (out - 1) / 2.0, dtype=torch.float64) + b) + 1.0 / patch - 1.0
        thetas.append(torch.cat([a_n.flip(0).flip(1), b_n.flip(0)[:, None]], dim=1))
        lo = torch.tensor([(2 * s + 1) / patch - 1 for s in p.crop_start], dtype=torch.float64)
        hi = torch.tensor([(2 * (s + z - 1) + 1) / patch - 1 for s, z in zip(p.crop_start, p.crop_size)], dtype=torch.float64)
        lows.append(lo.flip(0))
        highs.append(hi.flip(0))
    dev, dt = patches.device, patches.dtype
    theta = torch.stack(thetas).to(dev, dt)
    grid = F.affine_grid(theta, [n, 1, out, out, out], align_corners=False)
    lo = torch.stack(lows).to(dev, dt).view(n, 1, 1, 1, 3)
    hi = torch.stack(highs).to(dev, dt).view(n, 1, 1, 1, 3)
    grid.clamp_(lo, hi)  # border padding of the crop, as MONAI's Resize + Rotate(border) give
    return F.grid_sample(patches, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _rotate_cpu(view: torch.Tensor, angles: Sequence[float]) -> torch.Tensor:
    """Rotate a (1,S,S,S) view about its centre (MONAI Rotate, border padding)."""
    size = view.shape[-1]
    rot = rotation_matrix(angles)
    axes = [i for i, x in enumerate(angles) if x != 0.0]
    if len(axes) == 1:
        axis = axes[0]
        plane = [i for i in range(3) if i != axis]
        r2 = rot[plane][:, plane]
        # 2D normalised affine (align_corners=False, same size): theta = R (axes reversed to x, y)
        theta = r2.flip(0).flip(1)
        theta = torch.cat([theta, torch.zeros(2, 1, dtype=torch.float64)], dim=1)[None].to(view.dtype)
        grid = F.affine_grid(theta, [1, 1, size, size], align_corners=False)
        slices = view.movedim(axis + 1, 0)  # (S,1,S,S): one 2D image per slice along the axis
        out = F.grid_sample(slices, grid.expand(size, -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=False)
        return out.movedim(0, axis + 1).contiguous()
    theta = torch.cat([rot.flip(0).flip(1), torch.zeros(3, 1, dtype=torch.float64)], dim=1)[None].to(view.dtype)
    grid = F.affine_grid(theta, [1, 1, size, size, size], align_corners=False)
    return F.grid_sample(view[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def cpu_spatial(patches: torch.Tensor, params: Sequence[ViewParams], out: int) -> torch.Tensor:
    """(n,1,P,P,P) -> (n,1,out^3): slice, interpolate, flip, rotate only when drawn."""
    views = []
    for i, p in enumerate(params):
        (z, y, x), (dz, dy, dx) = p.crop_start, p.crop_size
        crop = patches[i : i + 1, :, z : z + dz, y : y + dy, x : x + dx]
        dims = [axis + 2 for axis in range(3) if p.flip[axis]]
        if dims:  # flipping commutes with the symmetric resize; the crop is the smaller tensor
            crop = torch.flip(crop, dims)
        view = F.interpolate(crop.float(), size=(out, out, out), mode="trilinear", align_corners=False)[0]
        if p.rotates:
            view = _rotate_cpu(view, p.angles)
        views.append(view)
    return torch.stack(views)


def _shift_contrast(view: torch.Tensor, shift: float, gamma: float) -> torch.Tensor:
    """In place: + shift, then MONAI AdjustContrast ((v - min) / (range + eps)) ** gamma * range + min.

    The shift moves min and max alike, so with a contrast change it only enters the final offset:
    a min/max and four in-place passes instead of seven.
    """
    if gamma == 1.0:
        return view.add_(shift) if shift != 0.0 else view
    lo, hi = torch.aminmax(view)
    rng = hi - lo
    inv = 1.0 / (rng + _EPS)
    view.sub_(lo).mul_(inv).pow_(gamma)  # (v - lo) first: exact zeros at the minimum, no NaN from pow
    return torch.addcmul(lo + shift, view, rng, out=view)


def _bias_field(x: torch.Tensor, coeffs: Sequence[float], order: int) -> torch.Tensor:
    """log-field = sum c_ijk P_i(z) P_j(y) P_k(x) over Legendre polynomials on [-1, 1]; x * exp(field)."""
    size = x.shape[-1]
    t = torch.linspace(-1.0, 1.0, size, device=x.device, dtype=x.dtype)
    legendre = [torch.ones_like(t), t]
    for k in range(1, order):
        legendre.append(((2 * k + 1) * t * legendre[k] - k * legendre[k - 1]) / (k + 1))
    field = torch.zeros((size, size, size), device=x.device, dtype=x.dtype)
    for c, (i, j, k) in zip(coeffs, bias_terms(order)):
        field += c * legendre[i].view(-1, 1, 1) * legendre[j].view(1, -1, 1) * legendre[k].view(1, 1, -1)
    return x * torch.exp(field)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (1,S,S,S) view, radius 3 sigma, replicate padding."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    v = x[None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[axis + 2] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        v = F.conv3d(F.pad(v, pad, mode="replicate"), kernel.view(shape))
    return v[0]


def _gamma_keep_stats(x: torch.Tensor, gamma: float) -> torch.Tensor:
    mean, std = x.mean(), x.std()
    lo = x.min()
    rng = x.max() - lo
    y = ((x - lo) / (rng + _EPS)) ** gamma * rng + lo
    return (y - y.mean()) / (y.std() + 1e-8) * std + mean


def intensity(x: torch.Tensor, params: Sequence[ViewParams], recipe: ViewRecipe) -> torch.Tensor:
    """Shift, contrast, then the optional MRI physics steps, per view of a (n,1,S,S,S) batch.

    Works in place on `x` (the fresh output of the spatial step); scalar per-view parameters keep
    every op a cheap scalar kernel rather than a broadcast power.
    """
    for i, p in enumerate(params):
        view = _shift_contrast(x[i], p.shift, p.contrast_gamma)
        if p.bias_coeffs:
            view = _bias_field(view, p.bias_coeffs, recipe.bias_field_order)
        if p.blur_sigma > 0:
            view = _gaussian_blur(view, p.blur_sigma)
        if p.noise_std > 0:
            g = torch.Generator(device=view.device).manual_seed(p.noise_seed)
            view = view + p.noise_std * torch.randn(view.shape, generator=g, device=view.device, dtype=view.dtype)
        if p.gamma != 1.0:
            view = _gamma_keep_stats(view, p.gamma)
        if view.data_ptr() != x[i].data_ptr():
            x[i] = view
    return x


def make_views(
    patches: torch.Tensor, params: Sequence[ViewParams], recipe: ViewRecipe, path: SpatialPath | None = None
) -> torch.Tensor:
    """Views (n,1,S,S,S) float32 from patches (n,1,P,P,P, float16 or float32) on their device.

    `path` defaults to `cpu` on the CPU and `fused` elsewhere.
    """
    if patches.ndim != 5 or patches.shape[1] != 1 or len(params) != patches.shape[0]:
        raise ValueError(f"patches must be (n,1,P,P,P) with one ViewParams each, got {tuple(patches.shape)} and {len(params)}")
    path = path or ("cpu" if patches.device.type == "cpu" else "fused")
    if path == "fused":
        x = fused_spatial(patches.float(), params, recipe.output_size)
    else:
        x = cpu_spatial(patches, params, recipe.output_size)  # converts only the crops to float32
    return intensity(x, params, recipe)
