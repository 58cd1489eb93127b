"""NT-Xent in one process: a naive reference, closed forms, symmetry, bf16, metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ds_simclr.loss import contrastive_metrics, nt_xent


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss written plainly: full 2N x 2N cosine similarity, explicit loop over anchors."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    n = n2 // 2
    sim = F.cosine_similarity(z[:, None, :], z[None, :, :], dim=-1) / temperature
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n2):
        positive = (i + n) % n2
        others = [j for j in range(n2) if j != i]
        total = total - sim[i, positive] + torch.logsumexp(sim[i, others], dim=0)
    return total / n2


def _pair(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize("n,d,temperature", [(1, 4, 0.5), (5, 8, 0.5), (16, 32, 0.1), (7, 3, 1.0)])
def test_matches_naive_reference_value_and_gradient(n: int, d: int, temperature: float) -> None:
    a, b = _pair(n, d, seed=n)
    z1, z2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = nt_xent(z1, z2, temperature)
    loss.backward()

    r1, r2 = a.double().requires_grad_(), b.double().requires_grad_()
    expected = reference_nt_xent(r1, r2, temperature)
    expected.backward()

    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(z1.grad, r1.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z2.grad, r2.grad.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,temperature", [(1, 0.5), (4, 0.5), (60, 0.07)])
def test_identical_embeddings_give_log_2n_minus_1(n: int, temperature: float) -> None:
    z = torch.randn(1, 16).expand(n, 16)
    loss = nt_xent(z, z, temperature)
    assert loss.item() == pytest.approx(math.log(2 * n - 1), rel=1e-6)


def test_symmetric_in_the_two_views() -> None:
    z1, z2 = _pair(9, 12)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(nt_xent(z2, z1, 0.5).item(), rel=1e-6)


def test_invariant_to_embedding_scale() -> None:
    z1, z2 = _pair(6, 10)
    assert nt_xent(z1, z2, 0.3).item() == pytest.approx(nt_xent(5 * z1, 0.2 * z2, 0.3).item(), rel=1e-6)


def test_order_of_pairs_does_not_matter() -> None:
    z1, z2 = _pair(8, 6)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(nt_xent(z1[perm], z2[perm], 0.5).item(), rel=1e-6)


def test_positive_pairs_lower_the_loss() -> None:
    z1, _ = _pair(8, 32)
    noisy = z1 + 0.05 * torch.randn_like(z1)
    shuffled = z1[torch.roll(torch.arange(8), 1)]
    assert nt_xent(z1, noisy, 0.5) < nt_xent(z1, shuffled, 0.5)


def test_bf16_inputs_are_computed_in_fp32() -> None:
    a, b = _pair(32, 64)
    z1 = a.bfloat16().requires_grad_()
    z2 = b.bfloat16().requires_grad_()
    loss = nt_xent(z1, z2, 0.1)
    loss.backward()
    assert loss.dtype == torch.float32
    assert z1.grad is not None and z1.grad.dtype == torch.bfloat16 and torch.isfinite(z1.grad.float()).all()
    # Same bf16-rounded inputs in fp32: identical result, so nothing ran in bf16 after the cast.
    assert loss.item() == pytest.approx(nt_xent(z1.float(), z2.float(), 0.1).item(), rel=1e-6)
    assert loss.item() == pytest.approx(nt_xent(a, b, 0.1).item(), rel=1e-2)


def test_no_nan_with_small_temperature_and_half_precision() -> None:
    z1 = torch.randn(16, 8).half().requires_grad_()
    loss = nt_xent(z1, z1.detach() + 0.01, 0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad.float()).all()


def test_gather_false_equals_gather_true_without_process_group() -> None:
    z1, z2 = _pair(5, 7)
    assert nt_xent(z1, z2, 0.5, gather=False).item() == nt_xent(z1, z2, 0.5, gather=True).item()


@pytest.mark.parametrize(
    "z1,z2,temperature",
    [
        (torch.randn(4, 8), torch.randn(5, 8), 0.5),
        (torch.randn(4), torch.randn(4), 0.5),
        (torch.randn(4, 8), torch.randn(4, 8), 0.0),
    ],
)
def test_bad_inputs_raise(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> None:
    with pytest.raises(ValueError):
        nt_xent(z1, z2, temperature)


def test_metrics_for_identical_views_of_distinct_samples() -> None:
    z = torch.eye(6, 16) + 0.01 * torch.randn(6, 16)
    m = contrastive_metrics(z, z.clone(), 0.5)
    assert m["positive_top1"] == 1.0
    assert m["alignment"] == pytest.approx(0.0, abs=1e-6)
    # Near-orthogonal unit vectors: squared distance ~2, so uniformity ~ -4.
    assert m["uniformity"] == pytest.approx(-4.0, abs=0.1)


def test_metrics_for_collapsed_and_random_embeddings() -> None:
    collapsed = torch.ones(8, 4)
    m = contrastive_metrics(collapsed, collapsed, 0.5)
    assert m["uniformity"] == pytest.approx(0.0, abs=1e-6)
    z1, z2 = _pair(8, 16)
    u1, u2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    m = contrastive_metrics(z1, z2, 0.5)
    assert m["alignment"] == pytest.approx((u1 - u2).pow(2).sum(1).mean().item(), rel=1e-5)
    expected_uniformity = sum(torch.pdist(u, p=2).pow(2).mul(-2).exp().mean().log().item() for u in (u1, u2)) / 2
    assert m["uniformity"] == pytest.approx(expected_uniformity, rel=1e-5)
    assert 0.0 <= m["positive_top1"] <= 1.0


def test_metrics_do_not_touch_gradients() -> None:
    z1 = torch.randn(4, 8, requires_grad=True)
    contrastive_metrics(z1, torch.randn(4, 8), 0.5)
    assert z1.grad is None


def test_rankme_is_the_effective_rank_of_the_centred_embeddings() -> None:
    collapsed = torch.ones(4, 16)
    assert contrastive_metrics(collapsed, collapsed, 0.5)["rankme"] == pytest.approx(1.0)
    corners = torch.eye(8, 32)  # 8 points of a regular simplex: 7 equal singular values once centred
    assert contrastive_metrics(corners[:4], corners[4:], 0.5)["rankme"] == pytest.approx(7.0, rel=1e-4)
    low = torch.randn(8, 2) @ torch.randn(2, 32)  # rank 2 before centring, at most 2 after
    assert 1.0 < contrastive_metrics(low[:4], low[4:], 0.5)["rankme"] <= 2.0 + 1e-4
