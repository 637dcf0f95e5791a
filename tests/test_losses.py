"""Tests of losses.py: label smoothing, CTC, and the ConST contrastive loss (METHODS §1.13)."""
import math

import torch
import torch.nn.functional as F

import data
import losses
import model as M


def test_label_smoothing_by_hand_and_ignores_the_tag():
    logits = torch.randn(2, 4, 7)
    target = torch.tensor([[5, 3, 4, 2], [5, 6, 2, 1]])          # tag, tokens, </s>, padding
    loss, nll, n = losses.label_smoothed_cross_entropy(logits, target, eps=0.1)
    lp = F.log_softmax(logits, -1)
    expect = torch.tensor(0.0)
    for b in range(2):
        for t in range(1, 4):
            if target[b, t] != data.PAD_ID:
                expect += 0.9 * -lp[b, t, target[b, t]] + 0.1 / 7 * -lp[b, t].sum()
    assert torch.allclose(loss, expect) and n == 5
    changed = logits.clone()
    changed[:, 0] = 100 * torch.randn(2, 7)                        # the language-tag position carries no loss
    assert torch.equal(losses.label_smoothed_cross_entropy(changed, target)[0], loss)


def test_ctc_targets_drop_tag_and_eos():
    torch.manual_seed(0)
    states, emb = torch.randn(2, 12, 8), torch.randn(10, 8)
    src = torch.tensor([[4, 7, 8, 9, 2], [4, 6, 2, 1, 1]])
    got = losses.ctc_loss(states, torch.tensor([12, 9]), emb, src, torch.tensor([5, 3]))
    lp = F.log_softmax(states @ emb.T, -1).transpose(0, 1)
    expect = F.ctc_loss(lp, torch.tensor([7, 8, 9, 6]), torch.tensor([12, 9]), torch.tensor([3, 1]), blank=0,
                        reduction="sum")
    assert torch.allclose(got, expect)


def test_contrastive_limits():
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(8, 512, generator=g), dim=-1)
    assert losses.contrastive_loss(u, u, tau=0.02) / 8 < 1e-3                 # u = v: near zero at tau 0.02
    same_u, same_v = torch.randn(1, 16).repeat(8, 1), torch.randn(1, 16).repeat(8, 1)
    for tau in (0.02, 0.5):
        assert torch.allclose(losses.contrastive_loss(same_u, same_v, tau), torch.tensor(8 * math.log(8)), rtol=1e-5)


def test_contrastive_direction_by_hand_and_symmetric():
    u = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    v = torch.tensor([[1.0, 0.2], [0.0, 1.0]])
    tau = 0.5
    cos = F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T
    s2t = -(torch.log_softmax(cos / tau, 1).diagonal()).sum()
    t2s = -(torch.log_softmax(cos.T / tau, 1).diagonal()).sum()
    assert torch.allclose(losses.contrastive_loss(u, v, tau), s2t)
    assert not torch.allclose(s2t, t2s)
    assert torch.allclose(losses.contrastive_loss(u, v, tau, symmetric=True), s2t + t2s)


def test_contrastive_scale_and_padding_invariance():
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    base = losses.contrastive_loss(u, v, 0.1)
    scale = torch.tensor([[2.0], [0.5], [7.0], [1.0]])
    assert torch.allclose(losses.contrastive_loss(u * scale, v, 0.1), base, atol=1e-5)
    assert torch.allclose(losses.contrastive_loss(u, v * scale, 0.1), base, atol=1e-5)
    # pooling ignores padding: extra padded frames of any value leave the pooled vector unchanged
    x, lens = torch.randn(2, 5, 16, generator=g), torch.tensor([5, 3])
    padded = torch.cat([x, 100 * torch.randn(2, 4, 16, generator=g)], 1)
    padded[1, 3:5] = 50.0
    x2 = x.clone()
    x2[1, 3:] = -9.0
    assert torch.allclose(M.masked_mean(padded, lens), M.masked_mean(x, lens), atol=1e-6)
    assert torch.allclose(M.masked_mean(x2, lens), M.masked_mean(x, lens), atol=1e-6)
