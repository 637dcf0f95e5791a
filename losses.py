"""losses.py: every objective not built on optimal transport.

So far: the label-smoothed cross-entropy of the three tasks (ConST Eq. 1's L_ST, L_ASR, L_MT), the
CTC loss from the speech low-level states to the transcript (ConST Table 5's alternative, and what
makes the speech side learn within minutes on a CPU, ../shared/CALIBRATION.md), and ConST's
contrastive loss (Eq. 2-4; not yet a recipe in train.py). Hard examples, S-Align, H-Align: next.

Every loss returns a SUM (over tokens or sentences) as the official ConST code does; train.py
divides the whole weighted sum by the number of ST target tokens (METHODS §1.4), so the papers'
weights carry over unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data import BOS_ID, PAD_ID


def label_smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, eps: float = 0.1,
                                 ignore_prefix: int = 1) -> tuple:
    """fairseq's label smoothing: (1 - eps) * nll + (eps / V) * sum_v(-log p_v), summed over non-pad
    tokens. The first `ignore_prefix` positions (the language tag) carry no loss (METHODS §1.4).

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
    """CTC from the speech low-level states to the transcript, maximising p(x | a) (ConST §5.3):
    the head is tied to the word embedding (ConST's `ctc_cnn`); blank is `<s>`, which never occurs in
    a transcript; targets drop `<lang:en>` and `</s>`. Summed over the batch.

    states (B, T, D), lens (B,), embed_weight (V, D), src (B, L) `<lang:en> x </s>`, src_lens (B,)."""
    lprobs = F.log_softmax(F.linear(states, embed_weight).float(), dim=-1).transpose(0, 1)   # (T, B, V)
    target_lens = src_lens - 2
    targets = src[:, 1:-1] if src.shape[1] > 2 else src[:, :0]
    return F.ctc_loss(lprobs, targets, lens, target_lens, blank=blank, reduction="sum", zero_infinity=True)


def contrastive_loss(u: torch.Tensor, v: torch.Tensor, tau: float = 0.02, symmetric: bool = False) -> torch.Tensor:
    """ConST's multi-class N-pair loss (Eq. 2-4, METHODS §1.5), summed over the batch:
        S[i, j] = cos(u_i, v_j) / tau,   L = sum_i -log softmax_j(S[i, :])[i]
    u (B, D) pooled speech, v (B, D) pooled transcripts (model.masked_mean); the other transcripts
    of the batch are the negatives. Speech->text only, as the released code; `symmetric` adds the
    text->speech direction (`--use-dual-ctr`)."""
    sim = F.normalize(u.float(), dim=-1) @ F.normalize(v.float(), dim=-1).T / tau      # (B, B)
    labels = torch.arange(len(u), device=u.device)
    loss = F.cross_entropy(sim, labels, reduction="sum")
    if symmetric:
        loss = loss + F.cross_entropy(sim.T, labels, reduction="sum")
    return loss
