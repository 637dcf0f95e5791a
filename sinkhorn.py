"""sinkhorn.py: Sinkhorn-Knopp, Multi-Assignment Sinkhorn-Knopp, learnable anchors and the SSPC loss.

SSPC (Swetha et al., ICCV 2023) keeps each modality's structure while the modalities are aligned:
every sample is described by a soft assignment to several learned anchors, computed by a
Multi-Assignment Sinkhorn-Knopp, and the assignment seen in the input space must agree with the one
seen in the joint space. The algorithm follows the official code (docs/methods.md, "SSPC:
Multi-Assignment Sinkhorn-Knopp"); the transfer to speech and transcript is this project's
adaptation (docs/methods.md, "SSPC: speech and transcript").

Read top to bottom:
  1. sinkhorn_knopp: entropic optimal transport with uniform marginals (SwAV), log domain
  2. multi_assignment_sinkhorn: r anchors per sample; the direct K x N x K form (the reference) and
     the exact 2 x N x K reduction that training uses (docs/methods.md, "SSPC: the two-slot reduction")
  3. Anchors, EmbeddingQueue and SSPC (the loss of §3.4 for speech s and transcript x)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# 1. Sinkhorn-Knopp
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3, log_domain: bool | None = None
                   ) -> torch.Tensor:
    """Entropic OT plan between N samples and K prototypes with uniform marginals (SwAV):
    Q = diag(u) exp(scores / eps) diag(v), rows summing to 1/N, columns to 1/K.
    scores (..., N, K) -> Q (..., N, K). Equivalent to POT's ot.sinkhorn(1/N, 1/K, M=-scores, reg=eps)
    at convergence. Each iteration fits the columns, then the rows (SwAV's order), so the row
    marginals are exact on return.

    When the scores span at most 50 * eps, exp(scores / eps) fits in fp32 and the iterations are two
    matrix-vector products on fixed potentials u, v; otherwise (large scores, small eps) they run in
    the log domain, which never overflows. `log_domain` forces one or the other."""
    N, K = scores.shape[-2:]
    s = scores.float() / eps
    s = s - s.amax(dim=(-2, -1), keepdim=True)
    if log_domain is None:
        log_domain = bool((-s.amin()) > 50)
    if log_domain:
        for _ in range(n_iters):
            s = s - torch.logsumexp(s, dim=-2, keepdim=True) - math.log(K)    # columns: 1/K each
            s = s - torch.logsumexp(s, dim=-1, keepdim=True) - math.log(N)    # rows: 1/N each
        return s.exp()
    kernel = s.exp()                                                         # (..., N, K), entries in (e^-50, 1]
    u = torch.ones(kernel.shape[:-1], device=kernel.device)                  # (..., N)
    for _ in range(n_iters):
        v = (1.0 / K) / (kernel.transpose(-2, -1) @ u[..., None])[..., 0]     # columns: 1/K each
        u = (1.0 / N) / (kernel @ v[..., None])[..., 0]                       # rows: 1/N each
    return u[..., :, None] * kernel * v[..., None, :]


# ----------------------------------------------------------------------------------------------
# 2. Multi-Assignment Sinkhorn-Knopp
# ----------------------------------------------------------------------------------------------
def _minmax_rows(t: torch.Tensor) -> torch.Tensor:
    lo, hi = t.min(-1, keepdim=True).values, t.max(-1, keepdim=True).values
    return (t - lo) / (hi - lo + 1e-12)


@torch.no_grad()
def multi_assignment_sinkhorn_direct(scores: torch.Tensor, r: int, eps: float = 0.07, n_iters: int = 20,
                                     low_weight: float = 0.25) -> tuple:
    """The official algorithm, as written: a transport tensor A over (slot m, sample n, anchor k)
    with K slots, the last r of weight 1 and the others of weight `low_weight`:
        A[m, n, k] ∝ exp(w_m S[n, k] / eps)
        repeat: A *= (N/K) / sum_n A      (every slot spreads N/K mass on every anchor)
                A /= sum_m A              (every sample-anchor pair is used once over all slots)
                A /= sum_k A              (every slot of every sample is a distribution over anchors)
        T = sum of the r high-weight slots: a soft top-r assignment, rows summing to r.
    Returns (Y, T, A): Y = T min-max normalised per row, the SSPC target. Memory K*N*K: a reference
    for tests; training uses `multi_assignment_sinkhorn`. scores (N, K)."""
    N, K = scores.shape
    w = scores.new_full((K,), low_weight, dtype=torch.float)
    w[K - r:] = 1.0
    log_a = w[:, None, None] * scores.float()[None] / eps                    # (K slots, N, K)
    # each slot's own maximum: then adding a constant to the scores changes nothing (the code's plain
    # exp and one global scale differ from this only through the 1e-5 guards below)
    a = torch.exp(log_a - log_a.amax(dim=(1, 2), keepdim=True))
    a = a / a.sum()
    for _ in range(n_iters):
        a = a * ((N / K) / (a.sum(1, keepdim=True) + 1e-5))
        a = a / (a.sum(0, keepdim=True) + 1e-5)
        a = a / (a.sum(2, keepdim=True) + 1e-5)
    a = a / a.sum(2, keepdim=True)
    t = a[K - r:].sum(0)
    return _minmax_rows(t), t, a


@torch.no_grad()
def multi_assignment_sinkhorn(scores: torch.Tensor, r: int, eps: float = 0.07, n_iters: int = 20,
                              low_weight: float = 0.25) -> tuple:
    """`multi_assignment_sinkhorn_direct` in O(N*K) memory, exactly (docs/methods.md, "SSPC: the
    two-slot reduction").

    Slots of equal weight start equal and every normalisation keeps them equal, so the K slots
    collapse into one low-weight slot of multiplicity K - r and one high-weight slot of
    multiplicity r; sums over slots weight the two by their multiplicities, and T = r * A_high.
    scores (..., N, K) -> (Y, T, A2) with Y, T (..., N, K) and A2 (..., 2, N, K)."""
    N, K = scores.shape[-2:]
    w = torch.tensor([low_weight, 1.0], device=scores.device)
    mult = torch.tensor([K - r, r], device=scores.device, dtype=torch.float)
    shape = (2,) + (1,) * 2
    log_a = w.view(shape) * scores.float().unsqueeze(-3) / eps                # (..., 2, N, K)
    a = torch.exp(log_a - log_a.amax(dim=(-2, -1), keepdim=True))
    a = a / (mult.view(shape) * a).sum(dim=(-3, -2, -1), keepdim=True)
    low, high = a[..., 0:1, :, :], a[..., 1:2, :, :]                        # views: updated in place
    for _ in range(n_iters):
        a.mul_((N / K) / (a.sum(-2, keepdim=True) + 1e-5))
        a.div_(low * (K - r) + high * r + 1e-5)
        a.div_(a.sum(-1, keepdim=True) + 1e-5)
    a.div_(a.sum(-1, keepdim=True))
    t = r * a[..., 1, :, :]
    return _minmax_rows(t), t, a


# ----------------------------------------------------------------------------------------------
# 3. Anchors, the queue, and the SSPC loss for speech (s) and transcript (x)
# ----------------------------------------------------------------------------------------------
class Anchors(nn.Module):
    """K learnable anchors in a d-dimensional space, N(0, 1) at start, L2-normalised at every use."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, dim))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """Cosine scores of (B, d) embeddings (normalised here) against every anchor: (B, K), in fp32 under
        autocast too (a bf16 cosine is off by ~0.004, which the costs' 1 / tau = 10 and Sinkhorn's 1 / eps
        magnify)."""
        with torch.autocast(e.device.type, enabled=False):
            return F.normalize(e.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).T


class EmbeddingQueue(nn.Module):
    """FIFO of the `size` most recent detached embeddings (targets only, no gradient). Starts with
    uniform random rows, as the official code; `full` once `size` rows have been pushed."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("rows", torch.rand(size, dim))
        self.register_buffer("pushed", torch.zeros((), dtype=torch.long))

    @property
    def full(self) -> torch.Tensor:
        """A bool tensor (reading it on the host would wait for the device every step)."""
        return self.pushed >= len(self.rows)

    @torch.no_grad()
    def push(self, x: torch.Tensor):
        """Append (B, d) rows at the end; the oldest leave from the front."""
        x = x.detach().to(self.rows.dtype)[-len(self.rows):]
        self.rows.copy_(torch.cat([self.rows[len(x):], x]))
        self.pushed += len(x)


def sspc_cost(pred: torch.Tensor, target: torch.Tensor, kind: str = "code", tau: float = 0.1) -> torch.Tensor:
    """The SSPC consistency cost between cosine predictions (B, K) and targets (B, K) in [0, 1].

    kind 'code' (the official code; docs/methods.md, "SSPC: the consistency loss"): mean
    BCEWithLogits(exp(P / tau), Y). The logit
    is always positive, so the cost is at least ln 2 * mean(1 - Y), whatever P.
    kind 'bce': mean BCEWithLogits(P / tau, Y).   kind 'ce': soft-target cross-entropy
    -sum_k Yhat_k log softmax(P / tau)_k with Yhat = Y / sum(Y), averaged over the batch."""
    pred = pred.float()
    if kind == "code":
        return F.binary_cross_entropy_with_logits((pred / tau).exp(), target)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(pred / tau, target)
    if kind == "ce":
        soft = target / target.sum(-1, keepdim=True).clamp(min=1e-12)
        return -(soft * F.log_softmax(pred / tau, dim=-1)).sum(-1).mean()
    raise ValueError(f"sspc cost must be 'code', 'bce' or 'ce', not {kind!r}")


class SSPC(nn.Module):
    """The SSPC loss adapted to speech translation (docs/methods.md, "SSPC: speech and transcript"):
    modalities s (speech) and x
    (transcript); input space = pooled low-level states, joint space = pooled shared-encoder states.

    For every pair (m, n) of modalities, two terms (docs/methods.md, "SSPC: the consistency loss"):
      cost(cos(e_in[m], A_in[m]), Y[cos(e_j[n], A_j[m])])     input-space prediction, joint-space target
      cost(cos(e_j[m],  A_j[n]),  Y[cos(e_in[n], A_in[n])])   joint-space prediction, input-space target
    Y = multi_assignment_sinkhorn over [queue; batch] scores, the batch's rows, without gradient.
    m = n terms are intra-modal, m != n cross-modal. The loss is 0 until a step starts with the queues full
    (as the official code: its targets never come from the queues' random initial rows)."""

    def __init__(self, dim: int, k: int = 64, r: int | None = None, queue: int = 4096, eps: float = 0.07,
                 n_iters: int = 20, low_weight: float = 0.25, cost: str = "code", modalities=("s", "x")):
        super().__init__()
        self.k, self.r = k, r if r is not None else k // 2
        self.eps, self.n_iters, self.low_weight, self.cost = eps, n_iters, low_weight, cost
        self.modalities = modalities
        self.anchors_in = nn.ModuleDict({m: Anchors(k, dim) for m in modalities})
        self.anchors_j = nn.ModuleDict({m: Anchors(k, dim) for m in modalities})
        self.queue_in = nn.ModuleDict({m: EmbeddingQueue(queue, dim) for m in modalities})
        self.queue_j = nn.ModuleDict({m: EmbeddingQueue(queue, dim) for m in modalities})

    def targets(self, queue: EmbeddingQueue, e: torch.Tensor, anchors: Anchors) -> torch.Tensor:
        """Multi-SK assignment of the batch's rows, computed over queue + batch with current anchors."""
        with torch.no_grad():
            scores = anchors(torch.cat([queue.rows.to(e.dtype), e.detach()]))
            return multi_assignment_sinkhorn(scores, self.r, self.eps, self.n_iters, self.low_weight)[0][-len(e):]

    def forward(self, e_in: dict, e_j: dict) -> tuple:
        """e_in[m], e_j[m]: (B, d) pooled embeddings per modality -> (loss, logs). Pushes the batch."""
        intra, cross = 0.0, 0.0
        # input-space targets depend on n only: one Multi-SK per modality, not per pair
        y_input = {n: self.targets(self.queue_in[n], e_in[n], self.anchors_in[n]) for n in self.modalities}
        for m in self.modalities:
            for n in self.modalities:
                y_joint = self.targets(self.queue_j[n], e_j[n], self.anchors_j[m])
                term = (sspc_cost(self.anchors_in[m](e_in[m]), y_joint, self.cost)
                        + sspc_cost(self.anchors_j[n](e_j[m]), y_input[n], self.cost))
                if m == n:
                    intra = intra + term
                else:
                    cross = cross + term
        usage = list(y_input.values())
        on = torch.stack([q.full for q in (*self.queue_in.values(), *self.queue_j.values())]).all()   # before this push
        for m in self.modalities:
            self.queue_in[m].push(e_in[m])
            self.queue_j[m].push(e_j[m])
        p = torch.cat(usage).float()
        p = (p / p.sum(-1, keepdim=True).clamp(min=1e-12)).mean(0)
        logs = {"sspc_intra": intra.detach(), "sspc_cross": cross.detach(),      # tensors: read when logged
                "anchor_entropy": -(p * p.clamp(min=1e-12).log()).sum(), "sspc_on": on.float()}
        return (intra + cross) * on, logs
