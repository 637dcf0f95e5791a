"""Tests of sinkhorn.py: the properties of docs/methods.md, "SSPC", and agreement with POT."""
import math

import pytest
import torch

import sinkhorn as S


def cosine_scores(n, k, seed=0, dim=32):
    g = torch.Generator().manual_seed(seed)
    e = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    a = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=-1)
    return e @ a.T


# ---------------------------------------------------------------------------------------- Sinkhorn-Knopp
@pytest.mark.parametrize("eps", [0.5, 0.05])
def test_sinkhorn_knopp_matches_pot(eps):
    ot = pytest.importorskip("ot")                  # test-only reference (POT)
    for seed in range(3):
        scores = cosine_scores(60, 12, seed).double()
        ours = S.sinkhorn_knopp(scores, eps=eps, n_iters=2000).double()
        a, b = torch.full((60,), 1 / 60, dtype=torch.double), torch.full((12,), 1 / 12, dtype=torch.double)
        ref = ot.sinkhorn(a.numpy(), b.numpy(), (-scores).numpy(), eps, method="sinkhorn_log", numItermax=20000,
                          stopThr=1e-13)
        assert (ours - torch.from_numpy(ref)).abs().max() <= 1e-5


def test_sinkhorn_knopp_marginals_batched_and_stable():
    scores = torch.stack([cosine_scores(200, 16, s) for s in range(3)])
    q = S.sinkhorn_knopp(scores, eps=0.05, n_iters=500)
    assert q.shape == (3, 200, 16)
    assert torch.allclose(q.sum(-1), torch.full((3, 200), 1 / 200), atol=1e-6)
    assert torch.allclose(q.sum(-2), torch.full((3, 16), 1 / 16), atol=1e-4)
    # scores / eps of 5000: plain-space exp would overflow; the log domain stays finite
    extreme = S.sinkhorn_knopp(scores * 50, eps=0.01, n_iters=50)
    assert torch.isfinite(extreme).all() and torch.allclose(extreme.sum(-1), torch.full((3, 200), 1 / 200), atol=1e-6)
    # the two ways of iterating give the same plan where both are safe
    plain = S.sinkhorn_knopp(scores, eps=0.05, n_iters=30, log_domain=False)
    logd = S.sinkhorn_knopp(scores, eps=0.05, n_iters=30, log_domain=True)
    assert (plain - logd).abs().max() <= 1e-7 * 200
    x = cosine_scores(30, 5).requires_grad_()
    assert not S.sinkhorn_knopp(x).requires_grad                                  # a target: no gradient


# ---------------------------------------------------------------------------------------- Multi-SK
def test_multi_sk_reduced_equals_direct():
    scores = cosine_scores(256, 16, 1)
    y1, t1, a1 = S.multi_assignment_sinkhorn_direct(scores, r=8)
    y2, t2, a2 = S.multi_assignment_sinkhorn(scores, r=8)
    assert (y1 - y2).abs().max() < 1e-5 and (t1 - t2).abs().max() < 1e-5
    assert torch.allclose(a1[0], a2[0], atol=1e-6) and torch.allclose(a1[-1], a2[1], atol=1e-6)


def test_multi_sk_shapes_range_and_marginals():
    N, K, r = 512, 16, 4
    scores = cosine_scores(N, K, 2)
    for fn in (S.multi_assignment_sinkhorn_direct, S.multi_assignment_sinkhorn):
        y, t, a = fn(scores, r=r, eps=0.2, n_iters=500)
        assert y.shape == (N, K) and y.min() >= 0 and y.max() <= 1
        assert torch.allclose(y.max(1).values, torch.ones(N)) and torch.allclose(y.min(1).values, torch.zeros(N))
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-4)             # slot rows sum to 1
        assert torch.allclose(a.sum(-2), torch.full((a.shape[0], K), N / K), rtol=1e-4)   # slot columns N/K
        mult = torch.ones(K) if a.shape[0] == K else torch.tensor([K - r, r], dtype=torch.float)
        assert torch.allclose((mult[:, None, None] * a).sum(0), torch.ones(N, K), atol=1e-4)
        assert torch.allclose(t.sum(1), torch.full((N,), float(r)), atol=1e-4)            # r anchors per sample
        assert torch.allclose(t.sum(0), torch.full((K,), r * N / K), rtol=1e-4)           # even anchor use


def test_multi_sk_permutation_equivariance_and_shift_invariance():
    scores = cosine_scores(128, 16, 3)
    y = S.multi_assignment_sinkhorn(scores, r=8)[0]
    rows, cols = torch.randperm(128), torch.randperm(16)
    assert (S.multi_assignment_sinkhorn(scores[rows][:, cols], r=8)[0] - y[rows][:, cols]).abs().max() < 1e-6
    assert (S.multi_assignment_sinkhorn(scores + 0.3, r=8)[0] - y).abs().max() < 1e-5


def test_multi_sk_recovers_a_planted_top_r():
    N, K, r = 128, 16, 4
    g = torch.Generator().manual_seed(0)
    scores = torch.full((N, K), -0.2) + 0.05 * torch.randn(N, K, generator=g)
    planted = torch.stack([(torch.arange(r) + n) % K for n in range(N)])
    scores.scatter_(1, planted, 0.8 + 0.05 * torch.randn(N, r, generator=g))
    y = S.multi_assignment_sinkhorn(scores, r=r, n_iters=200)[0]
    top = y.topk(r, dim=1).indices.sort(1).values
    assert torch.equal(top, planted.sort(1).values)


# ---------------------------------------------------------------------------------------- anchors, queue, loss
def test_queue_is_fifo_and_detached():
    q = S.EmbeddingQueue(5, 2)
    assert not q.full
    x = torch.arange(14.0).view(7, 2).requires_grad_()
    q.push(x[:3])
    assert not q.full and torch.equal(q.rows[-3:], x[:3].detach())
    q.push(x[3:])
    assert q.full and torch.equal(q.rows, x[2:].detach()) and not q.rows.requires_grad   # the oldest left first
    assert int(q.pushed) == 7


def test_cost_lower_bound_and_variants():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(8, 16, generator=g)
    for pred in (torch.full((8, 16), -1.0), torch.zeros(8, 16), torch.rand(8, 16, generator=g) * 2 - 1):
        assert S.sspc_cost(pred, y) >= math.log(2) * (1 - y).mean() - 1e-6
    # the cleaner options reach lower cost when predictions agree with the targets
    y = (torch.rand(8, 16, generator=g) > 0.5).float()
    good, bad = 2 * y - 1, 1 - 2 * y
    for kind in ("bce", "ce"):
        assert S.sspc_cost(good, y, kind) < S.sspc_cost(bad, y, kind)
    with pytest.raises(ValueError, match="sspc cost"):
        S.sspc_cost(good, y, "l2")


def test_sspc_warms_up_then_sends_gradients_to_the_predicting_side_only():
    torch.manual_seed(0)
    loss_fn = S.SSPC(dim=8, k=6, queue=8)
    feats = {name: torch.randn(4, 8, requires_grad=True) for name in ("in_s", "in_x", "j_s", "j_x")}
    e_in, e_j = {"s": feats["in_s"], "x": feats["in_x"]}, {"s": feats["j_s"], "x": feats["j_x"]}
    loss, logs = loss_fn(e_in, e_j)                              # 4 rows pushed: queues not full yet
    assert loss.item() == 0 and logs["sspc_on"] == 0 and logs["sspc_intra"] > 0
    loss.backward()
    assert all(f.grad is None or (f.grad == 0).all() for f in feats.values())
    loss, logs = loss_fn(e_in, e_j)                              # fills the queues: its targets saw random rows
    assert loss.item() == 0 and logs["sspc_on"] == 0
    loss, logs = loss_fn(e_in, e_j)                              # starts full: on, as the official code
    assert logs["sspc_on"] == 1 and loss.item() > 0
    assert 0 < logs["anchor_entropy"] <= math.log(6) + 1e-6
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats.values())
    assert all(a.weight.grad is not None for a in (*loss_fn.anchors_in.values(), *loss_fn.anchors_j.values()))
    # targets carry no gradient: the joint embeddings get gradient only through joint predictions
    target = loss_fn.targets(loss_fn.queue_j["s"], e_j["s"], loss_fn.anchors_j["s"])
    assert not target.requires_grad
