"""losses.py: every objective not built on optimal transport.

Read top to bottom:
  1. the task losses: label-smoothed cross-entropy (ConST Eq. 1's L_ST, L_ASR, L_MT) and CTC
  2. ConST (Ye et al., 2022): the contrastive loss (Eq. 2-4), the cut-off views of its hard-example
     mining (§3.3), and the L2 alternative (Table 5)
  3. S-Align (Zhang et al., 2024): the modality discriminator, its adversarial losses and weight
     schedule as the official code runs them, the gradient-reversal variant, the mix-up and the
     text blank-noise of the continuous prediction space; H-Align (contrastive on the shared
     encoder's outputs)

Every loss returns a SUM (over tokens, or over sentences) as the official ConST code does; train.py
divides the whole weighted sum by the number of ST target tokens (docs/methods.md, "Objective: the
weighted sum in train.objective"), so the papers'
weights carry over unchanged. S-Align's adversarial losses are the exception: a MEAN over the rows
the discriminator scores, as the official S-Align code reduces them; train.py weighs them (and
H-Align) against our cross-entropy as that code does (`adversarial_weights` has the derivation).
The views that need the model (span-masked audio, repeated words) are made in train.py from
data.py's helpers; everything here is a function of tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import BOS_ID, PAD_ID
from model import lengths_to_padding_mask, masked_mean


# ----------------------------------------------------------------------------------------------
# 1. Task losses
# ----------------------------------------------------------------------------------------------
def label_smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, eps: float = 0.1,
                                 ignore_prefix: int = 1) -> tuple:
    """fairseq's label smoothing: (1 - eps) * nll + (eps / V) * sum_v(-log p_v), summed over non-pad
    tokens. The first `ignore_prefix` positions (the language tag) carry no loss (docs/methods.md,
    "Objective: ConST Eq. 1").

    logits (B, L, V), target (B, L) -> (loss sum, nll sum, number of scored tokens)."""
    logits, target = logits[:, ignore_prefix:], target[:, ignore_prefix:]
    lprobs = F.log_softmax(logits.float(), dim=-1)                      # fp32 under bf16 autocast
    keep = target != PAD_ID
    nll = -lprobs.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    smooth = -lprobs.sum(-1)
    loss = (1 - eps) * nll + (eps / lprobs.shape[-1]) * smooth
    return (loss * keep).sum(), (nll * keep).sum(), keep.sum()


def ctc_loss(states: torch.Tensor, lens: torch.Tensor, embed_weight: torch.Tensor, src: torch.Tensor,
             src_lens: torch.Tensor, blank: int = BOS_ID) -> torch.Tensor:
    """CTC from the speech states to the transcript, maximising p(x | a) (ConST §5.3): the head is tied
    to the word embedding (ConST's `ctc_cnn`, whose input is `SpeechTranslator.ctc_states`); blank is
    `<s>`, which never occurs in a transcript; targets drop `<lang:en>` and `</s>`. Summed over the batch.

    states (B, T, D), lens (B,), embed_weight (V, D), src (B, L) `<lang:en> x </s>`, src_lens (B,)."""
    lprobs = F.log_softmax(F.linear(states, embed_weight).float(), dim=-1).transpose(0, 1)   # (T, B, V)
    target_lens = src_lens - 2
    targets = src[:, 1:-1] if src.shape[1] > 2 else src[:, :0]
    return F.ctc_loss(lprobs, targets, lens, target_lens, blank=blank, reduction="sum", zero_infinity=True)


# ----------------------------------------------------------------------------------------------
# 2. ConST: contrastive loss, hard examples, L2
# ----------------------------------------------------------------------------------------------
def contrastive_loss(u: torch.Tensor, v: torch.Tensor, tau: float = 0.02, symmetric: bool = False) -> torch.Tensor:
    """ConST's multi-class N-pair loss (Eq. 2-4; docs/methods.md, "ConST: the contrastive loss"),
    summed over the batch:
        S[i, j] = cos(u_i, v_j) / tau,   L = sum_i -log softmax_j(S[i, :])[i]
    u (B, D) pooled speech, v (B, D) pooled transcripts (model.masked_mean); the other transcripts
    of the batch are the negatives. Speech->text only, as the released code; `symmetric` adds the
    text->speech direction (`--use-dual-ctr`). In fp32 under autocast too: a bf16 cosine is off by ~0.004,
    which 1/tau = 50 makes a logit off by 0.2."""
    with torch.autocast(u.device.type, enabled=False):
        sim = F.normalize(u.float(), dim=-1) @ F.normalize(v.float(), dim=-1).T / tau      # (B, B)
    labels = torch.arange(len(u), device=u.device)
    loss = F.cross_entropy(sim, labels, reduction="sum")
    if symmetric:
        loss = loss + F.cross_entropy(sim.T, labels, reduction="sum")
    return loss


def sequence_cutoff(x: torch.Tensor, lens: torch.Tensor, rate: float = 0.1) -> torch.Tensor:
    """ConST's sequence cut-off (SCut, §3.3, rate 0.1 in App. B): zero round(rate * T_i) random valid
    time rows of each utterance; no rescaling. Pool the result over the ORIGINAL lengths, so the
    zeroed rows count in the mean (docs/methods.md, "ConST: hard examples"). x (B, T, D), lens (B,)
    -> (B, T, D)."""
    valid = ~lengths_to_padding_mask(lens, x.shape[1])
    keys = torch.rand(valid.shape, device=x.device).masked_fill(~valid, 2.0)   # padding ranks last
    rank = keys.argsort(1).argsort(1)
    n_cut = torch.round(rate * lens.to(torch.float32)).long()
    return x.masked_fill((rank < n_cut[:, None])[..., None], 0.0)


def feature_cutoff(x: torch.Tensor, lens: torch.Tensor, rate: float = 0.1) -> torch.Tensor:
    """ConST's feature cut-off (FCut): zero round(rate * D) random feature columns of each utterance,
    at every time step. x (B, T, D), lens (B,) -> (B, T, D)."""
    B, _, D = x.shape
    rank = torch.rand(B, D, device=x.device).argsort(1).argsort(1)
    return x.masked_fill((rank < round(rate * D))[:, None, :], 0.0)


def l2_alignment_loss(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ConST Table 5's L2 alternative: sum_i ||u_i - v_i||^2 between the pooled low-level speech and
    transcript vectors; no negatives, so nothing stops both sides from shrinking. u, v (B, D)."""
    return (u.float() - v.float()).pow(2).sum()


# ----------------------------------------------------------------------------------------------
# 3. S-Align: modality discriminator, adversarial losses, mix-up and noise; H-Align
# ----------------------------------------------------------------------------------------------
class ModalityDiscriminator(nn.Module):
    """S-Align's modal network (the official `TaskNetwork`; docs/methods.md, "S-Align: the modality
    discriminator"): a residual MLP on every
    position of the shared encoder's output, a masked mean over time, one logit per sentence.
    Convention: speech = 0, text = 1. (The official code averages speech over padding too, an
    artefact of its disabled speech mask; we mask both modalities: docs/methods.md, "Differences: S-Align".)

    z (B, T, D), lens (B,) -> logits (B, 1)."""

    def __init__(self, dim: int, hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        hidden = hidden or dim // 2
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, 1, bias=False)

    def forward(self, z: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        h = self.layer_norm(z + self.dropout(self.fc2(F.relu(self.fc1(z)))))
        return self.out_proj(masked_mean(h, lens))


def modality_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean_i w_i * BCEWithLogits(logit_i, y_i) over the rows scored, the official code's reduction
    (`binary_cross_entropy_with_logits(..., weight=w, reduction="mean")`): a MEAN over rows of the
    length-weighted BCE, neither a sum over rows nor divided by sum(w). logits (N, 1), target (N,)
    in [0, 1], weight (N,) (each sentence's length)."""
    return F.binary_cross_entropy_with_logits(logits.float().squeeze(-1), target.float(), weight=weight.float(),
                                              reduction="mean")


def stack_rows(*parts: tuple) -> tuple:
    """The rows the discriminator scores as one batch, as the official code concatenates them: each
    part is (z (N_k, T_k, D), lens (N_k,)); time is zero-padded to the longest part (padding never
    changes D's output). -> (z (sum N_k, max T_k, D), lens (sum N_k,))."""
    T = max(z.shape[1] for z, _ in parts)
    z = torch.cat([F.pad(z, (0, 0, 0, T - z.shape[1])) for z, _ in parts])
    return z, torch.cat([lens for _, lens in parts])


def discriminator_loss(disc: ModalityDiscriminator, z: torch.Tensor, lens: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
    """L_D = mean_i w_i BCE(D(sg(z_i)), y_i) over the 2B rows (B speech, B text; `stack_rows`;
    docs/methods.md, "S-Align: the adversarial losses"): the features are detached, so this term
    trains the discriminator only. y: speech 0, text 1, mixed r, noised text 1 - rho."""
    return modality_bce(disc(z.detach(), lens), target, weight)


def generator_loss(disc: ModalityDiscriminator, z: torch.Tensor, lens: torch.Tensor, weight: torch.Tensor,
                   target: float = 0.5) -> torch.Tensor:
    """L_G = mean_i w_i BCE(D_frozen(z_i), 0.5) over the 2B rows (docs/methods.md, "S-Align: the
    adversarial losses"): the encoders are
    pushed to make D maximally unsure for both modalities (a confusion target, not flipped labels).
    D runs with detached copies of its weights, so this term trains the encoders only. At D's
    equilibrium (logit 0) it equals mean(w) * ln 2 and its gradient is 0."""
    frozen = {name: p.detach() for name, p in disc.named_parameters()}
    logits = torch.func.functional_call(disc, frozen, (z, lens))
    return modality_bce(logits, torch.full_like(weight, target, dtype=torch.float32), weight)


# The official S-Align code's weight on its ST cross-entropy (its ST loss is 0.7 CE + 0.3 CTC). Its
# terms, written in its units (a, alpha * 0.3), enter train.objective divided by this: see below.
SALIGN_ST_CE_WEIGHT = 0.7


def adversarial_weights(step: int, total_steps: int, scale: float = 4.0, d_extra: float = 1.5,
                        decay_start: float = 0.5, decay_end: float = 0.9, gen_warmup: float = 0.02) -> tuple:
    """(weight of L_D, weight of L_G) at `step` in the official code's units: (1.5 a, a). The official
    schedule (docs/methods.md, "S-Align: weight schedule and scale"), written as fractions of its 50k
    updates: a = scale * min(1, (45k - step) / 20k),
    constant 4.0 up to 25k, linear decay to 0 at 45k; L_D gets an extra x1.5; L_G is off for the first
    1k updates.

    Their scale against our cross-entropy. One official training step (criterion
    `label_smoothed_cross_entropy_with_w2v_ctc_shrink_joint_AT_merge`, task `joint_triple_pretraining_merge`)
    backpropagates, term by term, 1.5 a L_D and a L_G, each the MEAN over the 2B rows D scores (B speech,
    B text) of w_i BCE_i (`modality_bce`), and 0.7 CE_ST + 0.3 CTC + 0.5 CE_MT, SUMS over tokens; fairseq
    then divides every gradient by one sample size. Per token, the generator term weighs a / (2B) against
    the ST cross-entropy's 0.7 on sum_i w_i BCE_i: a ratio of a / (1.4 B). train.objective adds our CE_ST
    with weight 1 and divides the whole sum by the ST target tokens; with L_G a mean over the 2B rows, the
    weight a / 0.7 gives (a / 0.7) (1 / 2B) sum_i w_i BCE_i against 1 * CE_ST: the same ratio a / (1.4 B).
    So the objective divides both weights by SALIGN_ST_CE_WEIGHT (1.5 a / 0.7 for L_D, which trains only
    D). Summing over the rows with weight a instead is 1.4 B times stronger (20-35x at B = 15-25). The
    common divisor (theirs: ST + MT tokens + 2B; ours: ST target tokens) scales every term alike.
    fp16: the official run's fp16 optimiser multiplies the task losses by its loss scale in
    `optimizer.backward`, but the adversarial terms are backpropagated with a plain `.backward()`, and
    every gradient is divided by the loss scale afterwards; so there the adversarial gradients are
    smaller by the loss scale (2^7 and more) once more. That is an artefact of mixed precision, which we
    document and do not copy."""
    start, end = decay_start * total_steps, decay_end * total_steps
    a = scale * min(1.0, max(0.0, (end - step) / (end - start)))
    return d_extra * a, (a if step >= gen_warmup * total_steps else 0.0)


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Gradient reversal layer (Ganin & Lempitsky, 2015): identity forward, -lam * gradient backward.
    S-Align's code has a GRL-style path too, but the configured one is the confusion objective above;
    this variant is here to teach the contrast: one loss BCE(D(GRL(z)), y) trains D to tell the
    modalities apart and the encoders to fool it."""
    return _GradientReversal.apply(x, lam)


def grl_lambda(progress: float) -> float:
    """DANN's ramp 2 / (1 + exp(-10 p)) - 1 from 0 to 1 over training progress p in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def length_proportional_alignment(speech_lens: torch.Tensor, text_lens: torch.Tensor, T: int) -> torch.Tensor:
    """For each speech frame t < T_i, the transcript position 1 + floor(t * n_i / T_i) of its word
    pieces (n_i = text length without `<lang:en>` and `</s>`): the approximate alignment of the
    length-proportional mix-up (docs/methods.md, "S-Align: mix-up and text noise"). -> (B, T) indices
    into the transcript."""
    t = torch.arange(T, device=speech_lens.device)[None]
    n = (text_lens - 2).clamp(min=1)[:, None]
    return 1 + torch.div(t * n, speech_lens.clamp(min=1)[:, None], rounding_mode="floor").clamp(max=n - 1)


def modality_mixup(speech: torch.Tensor, speech_lens: torch.Tensor, text_frames: torch.Tensor,
                   ratio: torch.Tensor) -> tuple:
    """S-Align's continuous prediction space (docs/methods.md, "S-Align: mix-up and text noise"): each
    valid speech position of sentence i
    is replaced, with probability r_i, by the text frame aligned to it; the discriminator's target
    for the mixed sentence is r_i, the fraction of text in it.

    speech, text_frames (B, T, D), speech_lens (B,), ratio (B,) -> (mixed (B, T, D), replaced (B, T))."""
    valid = ~lengths_to_padding_mask(speech_lens, speech.shape[1])
    replaced = (torch.rand(valid.shape, device=speech.device) < ratio[:, None]) & valid
    return torch.where(replaced[..., None], text_frames.to(speech.dtype), speech), replaced


def blank_noise(src: torch.Tensor, src_lens: torch.Tensor, punctuation: torch.Tensor, word_initial: torch.Tensor,
                p: float = 0.2, rho_max: float = 0.3, blank: int = BOS_ID) -> tuple:
    """S-Align's text noise (docs/methods.md, "S-Align: mix-up and text noise"), which makes a
    transcript look like CTC-shrunk speech:
    every punctuation piece becomes the blank `<s>`; with probability p, rho ~ U(0, rho_max) and
    round(n * rho) more blanks go in before random word-initial pieces (n = word pieces, tags and
    </s> excluded). The discriminator's target is 1 - rho whenever insertion fires, even if round(n * rho)
    is 0, and 1 when it does not.

    src (B, L) `<lang:en> x </s>`, src_lens (B,), punctuation / word_initial (V,) bool lookup tables
    -> (noised (B, L'), lengths (B,), target (B,), inserted (B,))."""
    rows, targets, inserted = [], [], []
    for b, n in enumerate(src_lens.tolist()):
        tokens = src[b, :n].clone()
        body = torch.zeros(n, dtype=torch.bool, device=src.device)
        body[1:n - 1] = True
        tokens[body & punctuation[tokens]] = blank
        starts = (body & word_initial[tokens]).nonzero().squeeze(1)
        rho, k = 0.0, 0
        if float(torch.rand((), device="cpu")) < p and len(starts):      # drawn on the host: the CPU's RNG
            rho = float(torch.rand((), device="cpu")) * rho_max
            k = round((n - 2) * rho)
        before = torch.zeros(n, dtype=torch.long, device=src.device)
        if k:
            picks = torch.randint(len(starts), (k,), device="cpu").to(src.device)
            before.index_add_(0, starts[picks], torch.ones(k, dtype=torch.long, device=src.device))
        # each token t becomes before[t] blanks followed by t
        counts = before + 1
        out = torch.full((int(counts.sum()),), blank, dtype=src.dtype, device=src.device)
        out[counts.cumsum(0) - 1] = tokens
        rows.append(out)
        targets.append(1.0 - rho)
        inserted.append(k)
    lens = torch.tensor([len(r) for r in rows], device=src.device)
    noised = torch.full((len(rows), int(lens.max())), PAD_ID, dtype=src.dtype, device=src.device)
    for b, r in enumerate(rows):
        noised[b, :len(r)] = r
    return noised, lens, torch.tensor(targets, device=src.device), torch.tensor(inserted, device="cpu")


def hard_alignment_loss(speech_high: torch.Tensor, speech_lens: torch.Tensor, text_high: torch.Tensor,
                        text_lens: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """H-Align as S-Align's code runs it (docs/methods.md, "S-Align: H-Align"): ConST's N-pair loss
    (Eq. 4) on the masked
    means of the SHARED ENCODER's outputs, speech pass vs transcript pass, tau 0.1, speech->text,
    summed over the batch. speech_high (B, T, D), text_high (B, L, D).

    Its scale: the code adds alpha * (N_src / B) * L_CL (N_src the batch's transcript tokens) to its CTC
    loss, which enters the ST loss with weight 0.3 next to the cross-entropy's 0.7. train.objective
    keeps that: (alpha * 0.3 = 0.45) * (N_src / B) * L_CL, divided by SALIGN_ST_CE_WEIGHT against our
    unit-weight cross-entropy, the same conversion as the adversarial terms' (`adversarial_weights`)."""
    return contrastive_loss(masked_mean(speech_high, speech_lens), masked_mean(text_high, text_lens), tau)
