"""Tests of losses.py: label smoothing, CTC, and the ConST contrastive loss (docs/methods.md, "ConST")."""
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


def test_contrastive_similarities_stay_fp32_under_bf16_autocast():
    """train.py computes the objective under bf16 autocast: the cosines must not be rounded to bf16,
    whose error 1/tau = 50 would blow up to ~0.2 of a logit."""
    torch.manual_seed(0)
    base = torch.randn(16, 256)
    u, v = base + 3 * torch.randn(16, 256), base + 3 * torch.randn(16, 256)    # cosines ~0.1: a hard batch
    exact = losses.contrastive_loss(u, v, 0.02, symmetric=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = losses.contrastive_loss(u, v, 0.02, symmetric=True)
        rounded = F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T / 0.02      # what autocast does to a bare product
    assert got.dtype == torch.float32 and torch.allclose(got, exact, rtol=1e-6)
    assert exact > 1.0                                                          # hard enough that rounding shows:
    sims = F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T / 0.02
    assert rounded.dtype == torch.bfloat16 and (rounded.float() - sims).abs().max() > 0.02


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


# ---- ConST hard examples, L2 (docs/methods.md, "ConST: hard examples", "ConST: other alignment losses")
def test_cutoffs_zero_exactly_the_right_rows_and_columns():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 16) + 5.0                               # no entry is 0 by chance
    lens = torch.tensor([50, 33, 7])
    cut = losses.sequence_cutoff(x, lens, rate=0.1)
    for b, T in enumerate(lens.tolist()):
        zero_rows = (cut[b] == 0).all(-1)
        assert zero_rows.sum() == round(0.1 * T) and not zero_rows[T:].any()      # only valid rows
        assert torch.equal(cut[b][~zero_rows], x[b][~zero_rows])                  # the rest untouched
    cut = losses.feature_cutoff(x, lens, rate=0.25)
    for b, T in enumerate(lens.tolist()):
        zero_cols = (cut[b, :T] == 0).all(0)
        assert zero_cols.sum() == round(0.25 * 16)
        assert torch.equal(cut[b][:, ~zero_cols], x[b][:, ~zero_cols])
    assert not torch.equal(losses.sequence_cutoff(x, lens), losses.sequence_cutoff(x, lens))   # random rows


def test_l2_alignment_by_hand():
    u, v = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    assert losses.l2_alignment_loss(u, v).item() == 4.0 + 25.0


# ---- S-Align (docs/methods.md, "S-Align") ---------------------------------------------------------
def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = losses.grad_reverse(x, 0.7)
    assert torch.equal(y, x)
    g = torch.randn(4, 3)
    y.backward(g)
    assert torch.allclose(x.grad, -0.7 * g)
    assert losses.grl_lambda(0.0) == 0.0 and abs(losses.grl_lambda(1.0) - 1) < 1e-4 and 0 < losses.grl_lambda(0.2) < 1


def _encoder_and_disc(seed=0):
    torch.manual_seed(seed)
    enc = torch.nn.Linear(8, 8)                                    # stands for the shared encoder
    disc = losses.ModalityDiscriminator(8, dropout=0.0)
    x, lens = torch.randn(3, 5, 8), torch.tensor([5, 3, 4])
    return enc, disc, enc(x), lens, torch.tensor([0.0, 1.0, 0.3]), lens.float()


def test_discriminator_loss_trains_only_the_discriminator():
    enc, disc, z, lens, y, w = _encoder_and_disc()
    losses.discriminator_loss(disc, z, lens, y, w).backward()
    assert all(p.grad is None or not p.grad.any() for p in enc.parameters())
    assert all(p.grad is not None and p.grad.any() for p in disc.parameters())


def test_generator_loss_leaves_the_discriminator_frozen():
    enc, disc, z, lens, y, w = _encoder_and_disc()
    losses.discriminator_loss(disc, z, lens, y, w).backward(retain_graph=True)
    alone = [p.grad.clone() for p in disc.parameters()]
    losses.generator_loss(disc, z, lens, w).backward()
    assert all(torch.allclose(p.grad, g, atol=1e-7, rtol=0) for p, g in zip(disc.parameters(), alone))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_generator_equilibrium_value_and_zero_gradient():
    enc, disc, z, lens, y, w = _encoder_and_disc()
    with torch.no_grad():
        disc.out_proj.weight.zero_()                               # D says logit 0 to everything
    loss = losses.generator_loss(disc, z, lens, w)
    # a mean over rows (docs/methods.md, "S-Align: the adversarial losses")
    assert abs(loss.item() - w.mean().item() * math.log(2)) < 1e-5
    loss.backward()
    assert all(p.grad.abs().max() < 1e-7 for p in enc.parameters())
    # off equilibrium the target 0.5 pulls both ways: a logit of +-2 costs the same
    logits = torch.tensor([[2.0], [-2.0]])
    bce = losses.modality_bce(logits, torch.full((2,), 0.5), torch.ones(2))
    assert abs(bce.item() - (math.log(1 + math.exp(2)) - 1.0)) < 1e-5


def test_modality_bce_is_the_official_mean_over_rows_and_stack_rows_scores_both_modalities():
    """The official reduction: binary_cross_entropy_with_logits(logits, y, weight=w, reduction="mean"),
    a mean over the rows of w_i BCE_i; not a sum over rows, not divided by sum(w)."""
    logits, y = torch.tensor([[1.5], [-0.3], [0.2], [2.0]]), torch.tensor([0.0, 1.0, 0.5, 0.3])
    w = torch.tensor([3.0, 7.0, 1.0, 12.0])
    by_hand = sum(wi * -(yi * math.log(torch.sigmoid(li).item()) + (1 - yi) * math.log(1 - torch.sigmoid(li).item()))
                  for li, yi, wi in zip(logits.flatten(), y.tolist(), w.tolist())) / 4
    assert abs(losses.modality_bce(logits, y, w).item() - by_hand) < 1e-5
    torch.manual_seed(0)
    disc = losses.ModalityDiscriminator(8).eval()
    speech, text = torch.randn(3, 11, 8), torch.randn(3, 5, 8)
    speech_lens, text_lens = torch.tensor([11, 6, 9]), torch.tensor([5, 2, 4])
    z, lens = losses.stack_rows((speech, speech_lens), (text, text_lens))
    assert z.shape == (6, 11, 8) and lens.tolist() == [11, 6, 9, 5, 2, 4]
    assert torch.allclose(disc(z, lens), torch.cat([disc(speech, speech_lens), disc(text, text_lens)]), atol=1e-6)


def test_modality_discriminator_shape_padding_and_order_invariance():
    torch.manual_seed(0)
    disc = losses.ModalityDiscriminator(8).eval()
    z, lens = torch.randn(2, 6, 8), torch.tensor([6, 4])
    out = disc(z, lens)
    assert out.shape == (2, 1)
    padded = torch.cat([z, 50 * torch.randn(2, 3, 8)], 1)           # any values in new padding
    assert torch.allclose(disc(padded, lens), out, atol=1e-6)
    perm = torch.tensor([3, 1, 0, 2])
    shuffled = z.clone()
    shuffled[1, :4] = z[1, perm]
    assert torch.allclose(disc(shuffled, lens), out, atol=1e-6)


def test_mixup_ratios_and_targets():
    torch.manual_seed(0)
    speech, text = torch.randn(3, 10_000, 4), torch.randn(3, 10_000, 4)
    lens = torch.tensor([10_000, 10_000, 6_000])
    same, none = losses.modality_mixup(speech, lens, text, torch.zeros(3))
    assert torch.equal(same, speech) and not none.any()
    full, every = losses.modality_mixup(speech, lens, text, torch.ones(3))
    assert every.sum(1).tolist() == lens.tolist() and torch.equal(full[2, 6000:], speech[2, 6000:])
    assert torch.equal(full[0], text[0])
    r = torch.tensor([0.2, 0.5, 0.9])
    mixed, replaced = losses.modality_mixup(speech, lens, text, r)
    frac = replaced.sum(1) / lens
    assert (frac - r).abs().max() < 0.02
    assert torch.equal(mixed[replaced], text[replaced]) and torch.equal(mixed[~replaced], speech[~replaced])
    # the length-proportional alignment walks through the word pieces in order
    idx = losses.length_proportional_alignment(torch.tensor([8, 3]), torch.tensor([6, 12]), 8)
    assert idx[0].tolist() == [1, 1, 2, 2, 3, 3, 4, 4] and idx[1, :3].tolist() == [1, 4, 7]
    assert (idx[1] <= 10).all()


def test_adversarial_schedule_matches_the_official_code():
    w = lambda step: losses.adversarial_weights(step, 50_000)           # noqa: E731
    assert w(0) == (6.0, 0.0) and w(999)[1] == 0.0 and w(1000) == (6.0, 4.0)
    assert w(25_000) == (6.0, 4.0) and w(35_000) == (3.0, 2.0) and w(45_000) == (0.0, 0.0) and w(60_000) == (0.0, 0.0)


def test_blank_noise_labels_counts_and_positions():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    V, TAG, BLANK = 30, 4, data.BOS_ID
    punctuation = torch.zeros(V, dtype=torch.bool)
    punctuation[[6, 7]] = True                                      # '.' and ','
    word_initial = torch.zeros(V, dtype=torch.bool)
    word_initial[10:20] = True                                      # '▁word' pieces; 20-29 continue a word
    rows = [torch.cat([torch.tensor([TAG]), torch.randint(6, 30, (int(n),), generator=g), torch.tensor([data.EOS_ID])])
            for n in torch.randint(5, 30, (200,), generator=g)]
    src, src_lens = data.pad_sequences(rows, data.PAD_ID)
    noised, lens, target, inserted = losses.blank_noise(src, src_lens, punctuation, word_initial, p=0.5)
    assert 40 < (inserted > 0).sum() < 160                           # fires about half the time
    for b, row in enumerate(rows):
        out = noised[b, :lens[b]]
        n_blank_punct = int(punctuation[row].sum())
        rho = 1 - target[b].item()
        assert inserted[b] == round((len(row) - 2) * rho)
        if inserted[b] == 0:
            assert target[b] == 1.0 or round((len(row) - 2) * rho) == 0
        assert (out == BLANK).sum() == n_blank_punct + inserted[b]
        assert torch.equal(out[out != BLANK], row[~punctuation[row]])   # nothing else changes
        clean = row.clone()
        clean[punctuation[row]] = BLANK
        # every inserted blank sits right before a word-initial piece (or before another inserted blank)
        j, extra = 0, 0
        for tok in out.tolist():
            if j < len(clean) and tok == clean[j].item():
                j += 1
            else:
                assert tok == BLANK
                k = j
                assert word_initial[clean[k]], (b, out.tolist(), clean.tolist())
                extra += 1
        assert extra == inserted[b]
    assert (target >= 0.7).all() and (target <= 1).all()


def test_h_align_is_the_contrastive_loss_on_encoder_outputs():
    torch.manual_seed(0)
    hs, ht = torch.randn(4, 9, 8), torch.randn(4, 5, 8)
    ls, lt = torch.tensor([9, 7, 3, 8]), torch.tensor([5, 4, 5, 2])
    expect = losses.contrastive_loss(M.masked_mean(hs, ls), M.masked_mean(ht, lt), tau=0.1)
    assert torch.allclose(losses.hard_alignment_loss(hs, ls, ht, lt), expect)
