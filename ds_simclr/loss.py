"""NT-Xent with negatives gathered from all ranks, and contrastive metrics (torch only).

NT-Xent (normalised temperature-scaled cross-entropy) from SimCLR: Chen et al., "A Simple Framework
for Contrastive Learning of Visual Representations", ICML 2020, https://arxiv.org/abs/2002.05709.
Alignment and uniformity from Wang & Isola, "Understanding Contrastive Representation Learning
through Alignment and Uniformity on the Hypersphere", ICML 2020, https://arxiv.org/abs/2005.10242.
RankMe from Garrido et al., "RankMe: Assessing the Downstream Performance of Pretrained
Self-Supervised Representations by Their Rank", ICML 2023, https://arxiv.org/abs/2210.02885.

Notation: n pairs on this rank, W ranks, N = n * W pairs in the global batch, D embedding size.
Global index layout of the 2N gathered embeddings (rank-major, then view, then sample):
    rank q, view v (0 or 1), local sample i  ->  q * 2n + v * n + i
so rank r's anchors are the rows r * 2n ... r * 2n + 2n - 1 ("labels offset by rank").

Per rank the loss builds only a (2n, 2N) logit matrix: the local anchors against all candidates;
never a (2N, 2N, D) tensor. Everything from normalisation on runs in float32, whatever the input
dtype (DeepSpeed bf16 hands us bf16 projections).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ds_simclr.dist import all_reduce_sum, gather_with_grad, rank, world_size


class _ReportGlobal(torch.autograd.Function):
    """Forward returns `value` (the global mean); backward sends the gradient to `local` unchanged.

    Why: every rank must report the same loss, but the gradient must come from the local part only
    (see `nt_xent`). Unlike `local + (value - local).detach()`, the returned number is bit-identical
    on every rank.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, local: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _check_pair(z1: torch.Tensor, z2: torch.Tensor) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (n, D) with the same shape; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 1:
        raise ValueError("z1 and z2 need at least one pair")


def _local_logits(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Masked logits of the local anchors against all candidates, their positive indices, and 2N.

    Returns logits (2n, 2N) float32 with self-similarity set to -inf, positives (2n,) int64 and 2N.
    """
    n = z1.shape[0]
    world, r = (world_size(), rank()) if gather else (1, 0)
    anchors = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, D) float32, unit rows
    candidates = gather_with_grad(anchors) if gather else anchors  # (2N, D), rank-major layout
    logits = anchors @ candidates.T / temperature  # (2n, 2N)
    local = torch.arange(2 * n, device=logits.device)  # (2n,) local anchor row
    own = r * 2 * n + local  # (2n,) global index of each anchor itself
    positives = r * 2 * n + (local + n) % (2 * n)  # (2n,) global index of the other view
    # In place is safe: neither the matmul's nor the division's backward needs `logits`.
    logits[local, own] = float("-inf")  # (2n, 2N), fp32 -inf: exp() is exactly 0, no copy, no mask
    return logits, positives, 2 * n * world


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """NT-Xent over the global batch; the same value on every rank.

    z1, z2: this rank's (n, D) projections of the two views (any float dtype; normalised inside in
    float32). n must be equal on every rank. temperature: > 0, divides the cosine similarities.
    gather: use all ranks' embeddings as candidates (N = n * W); False treats this rank's batch as
    the whole batch (N = n) and returns its own mean. Without a process group both are the same.

    Each of the 2N anchors is scored against the other 2N - 1 embeddings: its positive (the other
    view of the same sample) and 2N - 2 negatives. Returns a 0-dim float32 tensor, the mean of the
    2N cross-entropies.

    Gradient: this rank backpropagates local_ce_sum / (2n). The gather's backward sums over ranks
    the gradients of every rank's local term with respect to this rank's embeddings, so averaging
    parameter gradients over W ranks (as DeepSpeed does) gives
    (1/W) * sum_r d(local_ce_sum_r / 2n) = d(global_ce_sum / 2N): the gradient of the returned
    global mean in one process.
    """
    loss_local, ce_sum, two_big_n = nt_xent_local(z1, z2, temperature, gather)
    if not gather or world_size() == 1:
        return loss_local
    global_mean = all_reduce_sum(ce_sum) / two_big_n  # () detached, identical on every rank
    return _ReportGlobal.apply(loss_local, global_mean)


def nt_xent_local(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = True
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`nt_xent` without its closing all-reduce, for a caller that merges the loss into a collective of
    its own (the trainer's one all-reduce per optimizer step, `ds_simclr.dist.sum_and_any`).

    Returns loss_local () float32 = local_ce_sum / 2n, this rank's gradient-carrying term (backpropagate
    it: its gradient is `nt_xent`'s); ce_sum () float32, the sum of the 2n local cross-entropies (the
    global mean is its sum over ranks / 2N); and 2N. Same arguments as `nt_xent`.
    """
    _check_pair(z1, z2)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits, positives, two_big_n = _local_logits(z1, z2, temperature, gather)  # (2n, 2N), (2n,)
    ce_sum = F.cross_entropy(logits, positives, reduction="sum")  # () sum over the 2n local anchors
    return ce_sum / logits.shape[0], ce_sum, two_big_n


@torch.no_grad()
def contrastive_metrics(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> dict[str, float]:
    """Monitoring numbers for a step, over the global batch, identical on every rank.

    Kept apart from `nt_xent` so the loss stays minimal; costs one more gather (no gradients).
    - `positive_top1`: fraction of the 2N anchors whose highest-scoring candidate (among the other
      2N - 1, the loss's candidate set) is their positive. Chance is 1 / (2N - 1).
    - `alignment`: mean squared distance of normalised positive pairs, E||u - v||^2 (Wang & Isola);
      0 when both views embed identically, 4 at worst.
    - `uniformity`: log E exp(-2 ||x - y||^2) over distinct pairs of one view's N embeddings,
      averaged over the two views (Wang & Isola, t = 2); -4 is the ideal of a uniform sphere in
      high D, 0 a collapsed encoder. Needs N >= 2 (NaN otherwise).
    - `rankme`: effective rank of the 2N centred projections (RankMe): exp of the entropy of their
      normalised singular values; between 1 and min(2N - 1, D), about 1 when every embedding is
      alike (collapse), near min(2N - 1, D) when they spread over all directions.
    """
    _check_pair(z1, z2)
    n = z1.shape[0]
    logits, positives, two_big_n = _local_logits(z1, z2, temperature, gather=True)  # (2n, 2N), (2n,)
    hits = (logits.argmax(dim=1) == positives).sum()  # () correct local anchors
    top1 = all_reduce_sum(hits.double()) / two_big_n  # ()

    u1 = F.normalize(z1.float(), dim=1)  # (n, D)
    u2 = F.normalize(z2.float(), dim=1)  # (n, D)
    align = all_reduce_sum((u1 - u2).pow(2).sum(dim=1).sum().double()) / (two_big_n // 2)  # ()

    big_n = two_big_n // 2
    r = rank()
    log_uniform = []
    for u in (u1, u2):
        everyone = gather_with_grad(u)  # (N, D)
        sq_dist = (2 - 2 * u @ everyone.T).clamp_min(0)  # (n, N), ||a - b||^2 of unit vectors
        kernel = torch.exp(-2 * sq_dist)  # (n, N)
        own = torch.arange(n, device=u.device)  # (n,)
        kernel[own, r * n + own] = 0  # (n, N), drop each embedding's pair with itself
        total = all_reduce_sum(kernel.sum().double())  # () sum over the N (N - 1) ordered pairs
        log_uniform.append(math.log(total.item() / (big_n * (big_n - 1))) if big_n > 1 else math.nan)
    return {
        "positive_top1": float(top1),
        "alignment": float(align),
        "uniformity": sum(log_uniform) / 2,
        "rankme": effective_rank(gather_with_grad(torch.cat([z1, z2]).float())),
    }


def effective_rank(z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe of (M, D) embeddings after centring: exp(-sum p_k log p_k), p_k = s_k / sum(s) + eps
    over the singular values s (Garrido et al. 2023). Fewer than 2 rows, or identical rows, give 1."""
    if z.shape[0] < 2:
        return 1.0
    s = torch.linalg.svdvals(z.double() - z.double().mean(dim=0))  # (min(M, D),)
    if s.sum() == 0:
        return 1.0
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))
