"""The spec's speed options give the plain path's numbers and have taken effect (CPU).

Each option (activation checkpointing, channels_last_3d, torch.compile) is compared with the plain
model on the same weights and views: the NT-Xent loss and every parameter gradient. "Taken effect"
is checked on what the option is for: saved activations counted with saved_tensors_hooks, the
memory format of every activation, the graphs Dynamo compiled.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_simclr.loss import nt_xent
from ds_simclr.model import InstanceNorm3d, _InstanceNormChannelsLast, build_model, configure_speed

SIZE = 32


def _model(**speed: bool) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resenc_tiny", head_hidden=32, head_out=16, head_layers=2)
    return configure_speed(model, **speed)


def _views(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, SIZE, SIZE, SIZE, generator=g)
    return x, x + 0.3 * torch.randn(x.shape, generator=g)


def _loss_and_grads(model: nn.Module, dtype: torch.dtype = torch.float32) -> tuple[float, dict[str, torch.Tensor]]:
    model = model.to(dtype)
    v1, v2 = (v.to(dtype) for v in _views())
    z1, z2 = model(torch.cat([v1, v2])).chunk(2)  # one forward of both views, as the engine does
    loss = nt_xent(z1, z2, 0.5)
    loss.backward()
    return loss.item(), {name: p.grad.float() for name, p in model.named_parameters()}


def _assert_same(got: tuple[float, dict], want: tuple[float, dict], rel: float) -> None:
    """Loss within `rel`; every gradient element within `rel` of the largest gradient element.

    (Per tensor would divide by ~0 for conv biases in front of InstanceNorm, whose true gradient is
    0, and by a sum with heavy cancellation for the stem norm's bias; tests/test_engine.py does the same.)
    """
    assert got[0] == pytest.approx(want[0], rel=rel)
    assert got[1].keys() == want[1].keys()
    scale = max(g.abs().max().item() for g in want[1].values())
    worst = max((got[1][k] - want[1][k]).abs().max().item() for k in want[1]) / scale
    assert worst < rel, f"gradients differ by {worst:.2e} of the largest gradient"


def _saved_activation_bytes(model: nn.Module) -> tuple[int, int]:
    """(count, bytes) of distinct non-parameter tensors autograd keeps during one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.cat(_views()))
    return len(seen), sum(seen.values())


@pytest.fixture(scope="module")
def plain_fp32() -> tuple[float, dict]:
    return _loss_and_grads(_model())


@pytest.fixture(scope="module")
def exact() -> tuple[float, dict]:
    """The plain path in float64: what rounding is measured against."""
    return _loss_and_grads(_model(), torch.float64)


def test_activation_checkpointing_same_numbers_fewer_saved_tensors(plain_fp32) -> None:
    _assert_same(_loss_and_grads(_model(activation_checkpointing=True)), plain_fp32, rel=1e-5)
    plain_n, plain_bytes = _saved_activation_bytes(_model())
    ckpt_n, ckpt_bytes = _saved_activation_bytes(_model(activation_checkpointing=True))
    # What a checkpointed encoder keeps: the views, the stem's output and every stage's output but the
    # last (each the input of the next checkpoint), plus the small head's tensors.
    x, encoder = torch.cat(_views()), _model().encoder
    with torch.no_grad():
        boundaries = [x, encoder.stem(x), *encoder(x)[:-1]]
    boundary_bytes = sum(t.numel() * t.element_size() for t in boundaries)
    assert ckpt_n < plain_n / 4, (plain_n, ckpt_n)
    assert boundary_bytes <= ckpt_bytes < 1.01 * boundary_bytes < 0.35 * plain_bytes, (ckpt_bytes, boundary_bytes, plain_bytes)
    with torch.no_grad():  # nothing to save: no checkpoint either
        assert _model(activation_checkpointing=True)(torch.cat(_views())).shape == (4, 16)


def _error(got: tuple[float, dict], exact: tuple[float, dict]) -> tuple[float, float]:
    """(relative loss error, largest gradient-element error relative to the largest gradient)."""
    scale = max(g.abs().max().item() for g in exact[1].values())
    return abs(got[0] - exact[0]) / exact[0], max((got[1][k] - exact[1][k]).abs().max().item() for k in exact[1]) / scale


def test_channels_last_same_numbers_and_every_activation_ndhwc(plain_fp32, exact) -> None:
    model = _model(channels_last=True)
    layouts: dict[str, bool] = {}

    def record(name: str):
        def hook(_module: nn.Module, _inputs: tuple, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 5:
                layouts[name] = out.is_contiguous(memory_format=torch.channels_last_3d) and not out.is_contiguous()

        return hook

    for name, module in model.encoder.named_modules():
        module.register_forward_hook(record(name))
    _assert_same(_loss_and_grads(model), plain_fp32, rel=1e-4)
    assert len(layouts) > 30 and all(layouts.values()), [k for k, v in layouts.items() if not v]
    # bf16 (what a GPU run uses): no further from the float64 result than the plain bf16 path. (On this
    # CPU the plain path's bf16 head gradients are themselves far off, so the two are not compared directly.)
    plain_loss_error, plain_grad_error = _error(_loss_and_grads(_model(), torch.bfloat16), exact)
    loss_error, grad_error = _error(_loss_and_grads(_model(channels_last=True), torch.bfloat16), exact)
    assert loss_error < 1e-3 and plain_loss_error < 1e-3
    assert grad_error <= max(plain_grad_error, 0.05), (grad_error, plain_grad_error)


def test_channels_last_norm_gradients_match_torch() -> None:
    """The layout-keeping instance norm: float64 gradcheck, and equal to nn.InstanceNorm3d."""
    x = torch.randn(2, 3, 4, 3, 2, dtype=torch.float64).to(memory_format=torch.channels_last_3d).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _InstanceNormChannelsLast.apply(*a, 1e-5), (x, w, b))
    torch.manual_seed(0)
    theirs = nn.InstanceNorm3d(6, affine=True)
    nn.init.uniform_(theirs.weight, 0.5, 1.5)
    nn.init.uniform_(theirs.bias, -1.0, 1.0)
    ours = InstanceNorm3d(6, affine=True)
    ours.load_state_dict(theirs.state_dict())
    x = 3 + 2 * torch.randn(3, 6, 8, 6, 4)  # a mean far from 0, as conv outputs have
    a, c = x.clone().requires_grad_(), x.to(memory_format=torch.channels_last_3d).requires_grad_()
    out_a, out_c = theirs(a), ours(c)
    assert out_c.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out_c, out_a, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(x)
    out_a.backward(grad)
    out_c.backward(grad)
    torch.testing.assert_close(c.grad, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_same_numbers_and_compiled(exact) -> None:
    """Compiled in float64, so any difference is the compiled graph's, not rounding.

    (In float32 Inductor's fused norm reductions accumulate in float32 where torch's CPU kernels use
    float64; the instance norms' input gradients cancel heavily, so float32 results differ by ~3e-3
    of the largest gradient: measured, and the float64 run shows it is rounding.)
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model(compile=True)
    assert list(model.state_dict()) == list(_model().state_dict()), "nnSSL's state-dict names are kept"
    got = _loss_and_grads(model, torch.float64)
    assert counters["stats"]["unique_graphs"] >= 1, "Dynamo compiled no graph"
    assert not counters["graph_break"], dict(counters["graph_break"])
    loss_error, grad_error = _error(got, exact)
    assert loss_error < 1e-12 and grad_error < 1e-10, (loss_error, grad_error)
