# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. S-Align's adversarial game
#
# **Soft Alignment of Modality Space for End-to-end Speech Translation** (Zhang et al., ICASSP 2024)
# aligns speech and text in the *space* of the shared encoder, not pair by pair as ConST does: a small
# **modality discriminator** D looks at a sentence's encoder states and guesses "speech" or "text";
# the encoders are trained so that D cannot tell. Read next to `losses.py` (section 3) and
# `train.py` (`s_align_terms`, `objective`), and `docs/methods.md` ("S-Align").
#
# What this tutorial covers:
#
# 1. the discriminator and its two losses, $L_D$ and the **confusion** loss $L_G$ (towards 0.5),
#    against **gradient reversal** (GRL, the DANN way);
# 2. why the official loss is a **mean over the $2B$ scored rows** (B speech + B text sentences);
# 3. the real terms on one batch of a tiny model (`train.objective` with the `s-align` recipe);
# 4. a 2-D toy with two Gaussian clouds, "speech" and "text", where the game is visible.
#
# A caveat that holds throughout: the S-Align paper's body (its equations and tables) could not be read
# here; what follows comes from the authors' code, as `docs/methods.md` ("S-Align") says.

# %%
import math
import sys
import time
from pathlib import Path

try:
    ROOT = Path(__file__).resolve().parent.parent
except NameError:                         # in a notebook: the repository is the kernel's folder or one above it
    ROOT = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "losses.py").exists()), Path.cwd())
sys.path.insert(0, str(ROOT))

import matplotlib
if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import demo_corpus
import losses as L
import model as M
import train

torch.manual_seed(0)
torch.set_num_threads(1)
OUT = ROOT / "runs" / "tutorials" / "04_s_align_adversarial"
OUT.mkdir(parents=True, exist_ok=True)
T_START = time.time()
print("figures go to", OUT)

# %% [markdown]
# ## 1. The modality discriminator
#
# D reads the **shared encoder's output** $z_i \in \mathbb{R}^{T_i \times d}$ of sentence $i$: the ST
# pass for speech, the transcript's pass for text. Per position a residual MLP, then a masked mean
# over time, then one logit per sentence (`losses.ModalityDiscriminator`, the official `TaskNetwork`):
#
# $$h_t = \mathrm{LN}\big(z_t + \mathrm{Dropout}(W_2\,\mathrm{ReLU}(W_1 z_t + b_1) + b_2)\big),\qquad
#   \ell_i = D(z_i) = w_o^\top \frac{1}{T_i}\sum_{t \le T_i} h_t .$$
#
# The convention is **speech = 0, text = 1**: $\sigma(\ell_i)$ is D's probability that sentence $i$ is text.
# Because of the mean, padding and the order of positions do not change $\ell_i$.

# %%
torch.manual_seed(0)
disc = L.ModalityDiscriminator(dim=16, dropout=0.0)
z = torch.randn(3, 7, 16)                                  # (B, T, D) encoder states
lens = torch.tensor([7, 4, 2])
logits = disc(z, lens)                                     # (B, 1)
padded = torch.cat([z, torch.randn(3, 5, 16)], dim=1)      # five more padded positions, any values
shuffled = z.clone()
shuffled[0] = z[0, torch.randperm(7)]                      # valid positions of sentence 0 permuted
print("logits:", logits.squeeze(-1).tolist())
print("padding changes nothing:", torch.allclose(disc(padded, lens), logits, atol=1e-6))
print("time order changes nothing:", torch.allclose(disc(shuffled, lens), logits, atol=1e-6))

# %% [markdown]
# ## 2. Two players, one optimiser step
#
# The official code does not alternate optimiser steps and (in its configured path) uses no gradient
# reversal. In one step both players get their gradients, kept apart by `detach` and by freezing D:
#
# $$L_D = \frac{1}{2B}\sum_{i=1}^{2B} w_i\,\mathrm{BCE}\big(D(\mathrm{sg}(z_i)),\, y_i\big)
#   \qquad\text{(trains D only; } y_i = 0 \text{ speech, } 1 \text{ text)}$$
#
# $$L_G = \frac{1}{2B}\sum_{i=1}^{2B} w_i\,\mathrm{BCE}\big(D_{\text{frozen}}(z_i),\, \tfrac12\big)
#   \qquad\text{(trains the encoders only)}$$
#
# with $\mathrm{BCE}(\ell, y) = -y\log\sigma(\ell) - (1-y)\log(1-\sigma(\ell))$ and $\mathrm{sg}$ the
# stop-gradient. $L_G$'s target is **one half for both modalities**: the encoders are not asked to make
# speech look like text (flipped labels) but to make D *unsure*. This is the **confusion** objective:
#
# $$\mathrm{BCE}(\ell, \tfrac12) = \log(1+e^{\ell}) - \tfrac{\ell}{2} = \ln 2 + \tfrac{\ell^2}{8} + O(\ell^4),
#   \qquad \frac{\partial}{\partial \ell}\mathrm{BCE}(\ell, \tfrac12) = \sigma(\ell) - \tfrac12 .$$
#
# Its minimum is $\ln 2$, at $\ell = 0$, where its gradient vanishes: a sentence that D finds ambiguous
# is no longer pushed anywhere. The official code weighs the two terms $1.5a$ and $a$ ($a = 4$, constant
# for half of training, then decaying to 0 at 90 %; `losses.adversarial_weights`), and `train.py` adds
# them to Eq. 1's weighted sum with weights $\lambda_D \propto 1.5a$ and $\lambda_G \propto a$, scaled
# against our cross-entropy as `losses.adversarial_weights` derives:
#
# $$L = \frac{1}{N_{\text{tgt}}}\Big(L_{ST} + L_{ASR} + L_{MT} + L_{CTC} + \lambda_D\,L_D + \lambda_G\,L_G\Big).$$
#
# `losses.discriminator_loss` detaches the features; `losses.generator_loss` calls D through
# `torch.func.functional_call` with *detached copies of its weights*, so no gradient reaches D.

# %% [markdown]
# ### Why a mean over the $2B$ scored rows
#
# The official criterion stacks the B speech rows and the B text rows of a batch and calls
# `binary_cross_entropy_with_logits(logits, targets, weight=w, reduction="mean")` once. PyTorch's
# `"mean"` with a `weight` divides the weighted sum by the **number of rows** $2B$ (not by $\sum_i w_i$):
#
# $$\frac{1}{2B}\sum_{i=1}^{2B} w_i\,\ell_i .$$
#
# Three consequences:
#
# * **The value does not grow with the batch.** Doubling the batch (the same rows twice) leaves it
#   unchanged. A *sum* would double, and a fixed weight $a$ would mean twice as much against the task
#   losses in a batch twice as large.
# * **Its equilibrium is $\overline{w}\,\ln 2$.** When D outputs $\ell = 0$ everywhere, both losses equal
#   the mean weight times $\ln 2$ (`docs/methods.md`, "S-Align: the adversarial losses"). The length
#   weights $w_i$ (the official code weighs each row by its number of positions) change how much each
#   sentence counts *and* the overall scale, by $\overline{w}$, since the division is by the number of rows.
# * **$a = 4$ and the $\times 1.5$ were tuned on this scale.** The encoders receive $a\,L_G$ next to
#   the task losses, so the *size* of $L_G$ decides how hard the encoders are pushed. (D, which only
#   $L_D$ trains, hardly cares: Adam divides each parameter's step by its own gradient scale.)
#
# What the project's `losses.modality_bce` does with the rows is printed below: at equilibrium n rows of
# weight 1 are worth n ln 2 if it sums, ln 2 if it averages. The plots of this tutorial divide by that
# number, so they show a per-row mean whichever the reduction.

# %%
def rows_unit(n: int) -> float:
    """What losses.modality_bce returns for n rows at equilibrium (logit 0, target 0.5, weight 1), in
    units of ln 2: n if it sums over the rows, 1 if it takes their mean."""
    return float(L.modality_bce(torch.zeros(n, 1), torch.full((n,), 0.5), torch.ones(n))) / math.log(2)


print(f"losses.modality_bce over 8 rows at equilibrium = {rows_unit(8):g} x ln 2 "
      f"-> it {'sums over' if abs(rows_unit(8) - 8) < 1e-4 else 'averages'} the rows")

# %% [markdown]
# ### Exercise 4.1: the official reduction, by hand
#
# Write `official_bce(logits, targets, w)`: $\frac{1}{n}\sum_i w_i\,\mathrm{BCE}(\ell_i, y_i)$ over the
# $n$ rows given (B speech then B text), computed with `F.logsigmoid` (do not call
# `F.binary_cross_entropy_with_logits`). Hint: $\log(1 - \sigma(\ell)) = \log\sigma(-\ell)$.

# %%
def official_bce(logits: torch.Tensor, targets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """logits (n, 1), targets (n,) in [0, 1], w (n,) -> scalar: (1/n) sum_i w_i BCE(logit_i, y_i)."""
    ### BEGIN SOLUTION
    l = logits.float().squeeze(-1)
    bce = -(targets * F.logsigmoid(l) + (1 - targets) * F.logsigmoid(-l))
    return (w * bce).sum() / len(l)
    ### END SOLUTION


# %% tags=["check"]
g = torch.Generator().manual_seed(41)
B = 5
lg = torch.randn(2 * B, 1, generator=g) * 3
y = torch.cat([torch.zeros(B), torch.ones(B)])                       # speech 0, text 1
w = torch.randint(3, 20, (2 * B,), generator=g).float()              # lengths as weights
ref = F.binary_cross_entropy_with_logits(lg.squeeze(-1), y, weight=w, reduction="mean")
assert torch.allclose(official_bce(lg, y, w), ref, atol=1e-5), "not PyTorch's weighted mean over rows"
# the same rows twice: the mean does not move
assert torch.allclose(official_bce(torch.cat([lg, lg]), torch.cat([y, y]), torch.cat([w, w])), ref, atol=1e-5)
# equilibrium: logit 0 and target 0.5 give mean(w) * ln 2, and no gradient
l0 = torch.zeros(2 * B, 1, requires_grad=True)
eq = official_bce(l0, torch.full((2 * B,), 0.5), w)
assert abs(eq.item() - w.mean().item() * math.log(2)) < 1e-4, "L_G at logit 0 must be mean(w) ln 2"
eq.backward()
assert l0.grad.abs().max() < 1e-7, "the confusion loss has zero gradient at logit 0"
# the project's modality_bce reduces the same rows the same way, up to one constant (its reduction)
lg2 = torch.randn(2 * B, 1, generator=g)
ratios = [L.modality_bce(a, y, w) / official_bce(a, y, w) for a in (lg, lg2)]
assert abs(ratios[0].item() - ratios[1].item()) < 1e-4 * ratios[0].item()
print("Exercise 4.1 passed: mean over rows; losses.modality_bce = official x", round(ratios[0].item(), 4))

# %% [markdown]
# ### Gradient reversal, the other way to play
#
# Domain-adversarial training (Ganin & Lempitsky, 2015) uses **one** loss for both players and a
# *gradient reversal layer* between them:
#
# $$\mathrm{GRL}_\lambda(z) = z, \qquad \frac{\partial\,\mathrm{GRL}_\lambda(z)}{\partial z} = -\lambda I,
#   \qquad L_{\text{adv}} = \mathrm{BCE}\big(D(\mathrm{GRL}_\lambda(z)), y\big).$$
#
# D descends $L_{\text{adv}}$ (it learns to separate), the encoders *ascend* it (they learn to fool D):
# a min-max game with the true labels, where the confusion objective instead pulls towards 0.5.
# $\lambda$ is ramped with DANN's schedule $\lambda(p) = 2/(1 + e^{-10p}) - 1$ over training progress
# $p$ (`losses.grl_lambda`). The official S-Align code has a GRL-like path too, but its configured path
# is the confusion objective; `train.py` offers both (`--adv_variant=confusion|grl`).
#
# ### Exercise 4.2: a gradient reversal layer
#
# Write `MyGradReverse`, a `torch.autograd.Function` whose forward is the identity and whose backward
# multiplies the incoming gradient by $-\lambda$ (and returns no gradient for $\lambda$).

# %%
class MyGradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ### BEGIN SOLUTION
        ctx.lam = lam
        return x.view_as(x)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad):
        ### BEGIN SOLUTION
        return -ctx.lam * grad, None
        ### END SOLUTION


def my_grad_reverse(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    return MyGradReverse.apply(x, lam)


# %% tags=["check"]
g = torch.Generator().manual_seed(42)
x = torch.randn(4, 3, generator=g, requires_grad=True)
upstream = torch.randn(4, 3, generator=g)                 # the gradient that arrives from D's loss
for lam in (0.0, 0.3, 1.0, 2.5):
    x.grad = None
    out = my_grad_reverse(x, lam)
    assert torch.equal(out, x), "forward must be the identity"
    out.backward(upstream)
    assert torch.equal(x.grad, -lam * upstream), f"backward must be -lambda * g (lambda {lam})"
    mine = x.grad.clone()
    x.grad = None
    L.grad_reverse(x, lam).backward(upstream)
    assert torch.equal(mine, x.grad), "must agree with losses.grad_reverse"
assert abs(L.grl_lambda(0.0)) < 1e-12 and abs(L.grl_lambda(1.0) - 0.99991) < 1e-5
print("Exercise 4.2 passed: the reversed gradient is -lambda * g")

# %% [markdown]
# ### What each loss trains
#
# On the same discriminator and features, the three constructions route gradients differently.
# Below, `z` stands for the encoder output (a leaf we can read the gradient of):
#
# | loss | reaches D | reaches the encoder (z) |
# |---|---|---|
# | `discriminator_loss` (features detached) | yes | no |
# | `generator_loss` (D's weights detached) | no | yes, towards logit 0 |
# | BCE(D(GRL(z)), y) | yes, to separate | yes, reversed: to confuse |

# %%
def gradients(loss_fn):
    """Norms of the gradients that one loss sends to D's weights and to the features z."""
    torch.manual_seed(1)
    d = L.ModalityDiscriminator(dim=16, dropout=0.0)
    zz = torch.randn(4, 6, 16, requires_grad=True)
    ln = torch.tensor([6, 5, 3, 2])
    yy = torch.tensor([0.0, 0.0, 1.0, 1.0])
    loss_fn(d, zz, ln, yy, torch.ones(4)).backward()
    gd = sum(p.grad.norm() ** 2 for p in d.parameters() if p.grad is not None) ** 0.5
    return float(gd), (0.0 if zz.grad is None else float(zz.grad.norm()))


routes = {
    "discriminator_loss": lambda d, zz, ln, yy, ww: L.discriminator_loss(d, zz, ln, yy, ww),
    "generator_loss": lambda d, zz, ln, yy, ww: L.generator_loss(d, zz, ln, ww),
    "BCE(D(GRL(z)), y)": lambda d, zz, ln, yy, ww: L.modality_bce(d(L.grad_reverse(zz, 1.0), ln), yy, ww),
}
for name, fn in routes.items():
    gd, gz = gradients(fn)
    print(f"{name:20s} |grad D| = {gd:.4f}   |grad z| = {gz:.4f}")

# %% [markdown]
# ## 3. The real terms on one batch of a tiny model
#
# Now the same terms inside `train.objective`, with the `s-align` recipe on a tiny demo corpus (48
# spoken sentences, written in about a second into the output folder) and an untrained `tiny` model. Besides the plain
# speech (target 0) and transcript (target 1) rows, the recipe feeds D two kinds of soft rows
# (`docs/methods.md`, "S-Align: mix-up and text noise"): with probability 0.3 per batch a **mix-up** of
# speech and text frames at ratio $r \sim U(0,1)$ (target $r$), and **blank-noised** transcripts that look
# like CTC-shrunk speech (target $1-\rho$). D's task is then a regression over $[0, 1]$, "a continuous
# prediction space".

# %%
corpus = demo_corpus.write_demo_corpus(OUT / "demo_corpus",
                                       demo_corpus.DemoConfig(train=48, dev=4, test=4, talk_size=8, seed=3),
                                       verbose=False)
cfg = train.parse_config(["--recipe=s-align", f"--data={corpus}", "--vocab_size=200", "--dropout=0.0",
                          "--max_steps=1000", "--bf16=false", "--threads=1"])
vocab = data.build_vocab(corpus, cfg.vocab_size, verbose=False)
ds = data.MustcSplit(corpus, "train", vocab, verbose=False)
batch = data.collate([ds[i] for i in range(8)])
torch.manual_seed(0)
net = M.SpeechTranslator(train.model_config(cfg, len(vocab)))
aux = train.build_aligners(cfg, net.cfg.d_model)           # {'disc': ModalityDiscriminator(256)}
tables = train.text_tables(vocab)
print(f"batch of {len(batch)} sentences; model {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters; "
      f"discriminator {sum(p.numel() for p in aux.parameters()) / 1e3:.0f}k")
print("official schedule (1.5a for L_D, a for L_G) at steps 0, 10, 20, 500, 700, 900 of 1000:",
      [L.adversarial_weights(s, cfg.max_steps) for s in (0, 10, 20, 500, 700, 900)])

step = 100                                                  # past L_G's warm-up (2 % of training)
torch.manual_seed(0)
loss, terms = train.objective(cfg, net, batch, ("st", "asr", "mt"), step, aux, tables)
print(f"\nthe weighted sum at step {step}: loss {loss.item():.3f}; its terms before their weights, each divided by the "
      f"{int(batch.tgt_lens.sum())} target tokens, and the S-Align logs:")
for k, v in terms.items():
    print(f"  {k:9s} {v:8.4f}")
print(f"D's BCE per row {terms['disc_bce']:.3f} and G's {terms['gen_bce']:.3f}, against ln 2 = {math.log(2):.3f}: "
      "an untrained D is near chance")

# %% [markdown]
# The two adversarial terms by hand, on this batch, and where their gradients go. `out.speech_high`
# and `out.text_high` are the shared encoder's outputs for the speech and the transcript; D scores them
# as one set of $2B$ rows, and each sentence weighs its transcript length (`train.s_align_terms`
# explains why not the frame count).

# %%
torch.manual_seed(0)
disc = aux["disc"]
out = net(batch, ("st", "mt"), reencode_asr=False)
B = len(batch)
# the 2B rows D scores, stacked as the official code does: B speech, then B text, time zero-padded to
# the longer of the two (padding does not change D's output)
T = max(out.speech_high.shape[1], out.text_high.shape[1])
z = torch.cat([F.pad(out.speech_high, (0, 0, 0, T - out.speech_high.shape[1])),
               F.pad(out.text_high, (0, 0, 0, T - out.text_high.shape[1]))])        # (2B, T, D)
lens = torch.cat([out.speech_lens, out.text_lens])
y = torch.cat([torch.zeros(B), torch.ones(B)])
w = batch.src_lens.float().repeat(2)                      # each sentence weighs its transcript length
L_D = L.discriminator_loss(disc, z, lens, y, w)
L_G = L.generator_loss(disc, z, lens, w)
unit = rows_unit(2 * B) * float(w.mean())                 # what these rows weigh at equilibrium, over ln 2
print(f"L_D = {L_D.item():.3f}, L_G = {L_G.item():.3f}; per row and unit weight: "
      f"{L_D.item() / unit:.4f} and {L_G.item() / unit:.4f} (ln 2 = {math.log(2):.4f})")


def grad_norm(params) -> float:
    return sum(float(p.grad.norm()) ** 2 for p in params if p.grad is not None) ** 0.5


encoder = [p for n, p in net.named_parameters() if n.startswith("encoder_layers.")]
for name, term in (("L_D", L_D), ("L_G", L_G)):
    net.zero_grad(set_to_none=True)
    disc.zero_grad(set_to_none=True)
    term.backward(retain_graph=True)
    print(f"{name}.backward(): |grad| of D {grad_norm(disc.parameters()):.2e}, "
          f"of the shared encoder {grad_norm(encoder):.2e}")

# %% [markdown]
# D's gradient comes from $L_D$ only, the encoder's from $L_G$ only: one `backward()` of the whole sum
# and one optimiser step update both players correctly. In 256 dimensions the game cannot be watched;
# in two it can.
#
# ## 4. The game in two dimensions
#
# Two Gaussian clouds stand for the encoder outputs: **speech** (blue) and **text** (orange), the same
# shape but placed and turned differently. The "encoder" is a rigid map of the speech features
# (a rotation by a learned angle and a learned shift), so it can move the cloud but not squash it:
# the structure that the task losses protect in the real model is kept by construction. Text stays
# where it is, as a pretrained text space would (in S-Align, $L_G$ reaches the text side too).
#
# The real `ModalityDiscriminator` ends in a LayerNorm, which in two dimensions leaves only the sign of
# $h_1 - h_2$; the toy uses a small MLP with the same call signature `(z, lens) -> (B, 1)`, so that
# `losses.discriminator_loss`, `losses.generator_loss` and `losses.grad_reverse` run on it unchanged
# (each point is a "sentence" of one position).

# %%
BASE = torch.tensor([[0.9, 0.0], [0.0, 0.3]])              # the cloud's axes before it is turned


def rotation(angle) -> torch.Tensor:
    angle = torch.as_tensor(angle, dtype=torch.float32)
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])


SPEECH = (rotation(0.5) @ BASE, torch.tensor([-2.5, 1.5]))  # x = A e + m, e ~ N(0, I)
TEXT = (rotation(-0.9) @ BASE, torch.tensor([2.0, -1.0]))


def sample(cloud, n: int, g: torch.Generator) -> torch.Tensor:
    A, m = cloud
    return torch.randn(n, 2, generator=g) @ A.T + m


def log_density(cloud, x: torch.Tensor) -> torch.Tensor:
    A, m = cloud
    return torch.distributions.MultivariateNormal(m, A @ A.T).log_prob(x)


class ToyDiscriminator(nn.Module):
    """A 2-D discriminator with ModalityDiscriminator's interface: (B, T, 2), lens -> logits (B, 1)."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        return self.net(M.masked_mean(z, lens))


class RigidMap(nn.Module):
    """The toy encoder of the speech side: z = R(angle) x + shift."""

    def __init__(self):
        super().__init__()
        self.angle = nn.Parameter(torch.zeros(()))
        self.shift = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ rotation(self.angle).T + self.shift


# %% [markdown]
# ### Exercise 4.3: the best possible discriminator, and what $\ln 2$ means
#
# For two known densities the best discriminator is $D^*(z) = \frac{p_t(z)}{p_s(z) + p_t(z)}$, its logit
# is $\log p_t(z) - \log p_s(z)$, and with equally many rows of each modality its loss is
#
# $$L_D(D^*) = \tfrac12\,\mathbb{E}_{z\sim p_s}\big[-\log(1 - D^*(z))\big]
#            + \tfrac12\,\mathbb{E}_{z\sim p_t}\big[-\log D^*(z)\big] = \ln 2 - \mathrm{JSD}(p_s \,\|\, p_t).$$
#
# The Jensen-Shannon divergence lies in $[0, \ln 2]$ and is 0 only when $p_s = p_t$. So a discriminator
# loss **at $\ln 2$ means that even the best D is at chance: the two distributions agree**; any loss
# below $\ln 2$ measures a difference that is left. Write `optimal_disc_loss(x_s, x_t, logp_s, logp_t)`:
# the Monte Carlo estimate of $L_D(D^*)$ from samples `x_s` (speech) and `x_t` (text), given the two log
# densities as functions. Use the project's `losses.modality_bce` for the BCE and divide by
# `rows_unit(n)` so the result is a per-row mean whatever its reduction.

# %%
def optimal_disc_loss(x_s: torch.Tensor, x_t: torch.Tensor, logp_s, logp_t) -> float:
    """x_s, x_t (n, 2) samples; logp_s, logp_t: functions (n, 2) -> (n,) -> L_D(D*) per row."""
    ### BEGIN SOLUTION
    x = torch.cat([x_s, x_t])
    logit = (logp_t(x) - logp_s(x))[:, None]               # log D* - log(1 - D*)
    y = torch.cat([torch.zeros(len(x_s)), torch.ones(len(x_t))])
    return float(L.modality_bce(logit, y, torch.ones(len(x)))) / rows_unit(len(x))
    ### END SOLUTION


# %% tags=["check"]
g = torch.Generator().manual_seed(43)
n = 4000
xs, xt = sample(SPEECH, n, g), sample(TEXT, n, g)


def lp_speech(x):
    return log_density(SPEECH, x)


def lp_text(x):
    return log_density(TEXT, x)


# the same distribution on both sides: D* = 1/2 everywhere, the loss is ln 2 exactly
same = optimal_disc_loss(xs, sample(SPEECH, n, g), lp_speech, lp_speech)
assert abs(same - math.log(2)) < 1e-5, same
# the toy's two clouds at the start are far apart: D* separates them almost perfectly
apart = optimal_disc_loss(xs, xt, lp_speech, lp_text)
assert 0.0 <= apart < 0.01, apart
# a shifted copy: strictly between 0 and ln 2, and closer to ln 2 the smaller the shift
near = [optimal_disc_loss(xs, xs + torch.tensor([d, 0.0]), lp_speech,
                          lambda x, d=d: lp_speech(x - torch.tensor([d, 0.0]))) for d in (1.0, 0.25)]
assert 0.0 < near[0] < near[1] < math.log(2), near
# no discriminator does better than D*: a freshly initialised one is far worse
torch.manual_seed(0)
fresh = ToyDiscriminator()
ones = torch.ones(2 * n, dtype=torch.long)
with torch.no_grad():
    fresh_loss = float(L.modality_bce(fresh(torch.cat([xs, xt])[:, None], ones),
                                      torch.cat([torch.zeros(n), torch.ones(n)]), torch.ones(2 * n))) / rows_unit(2 * n)
assert apart < fresh_loss
print(f"Exercise 4.3 passed: L_D(D*) = {same:.4f} (same), {near[1]:.4f} / {near[0]:.4f} (shift 0.25 / 1), "
      f"{apart:.4f} (the toy's clouds); a fresh D: {fresh_loss:.4f}")

# %% [markdown]
# ### Playing the game
#
# One Adam optimiser over both players, one step per batch of 256 points per modality, as the official
# code does. Two variants from the same start:
#
# * **confusion** (S-Align's code): $1.5\,L_D + L_G$ with `losses.discriminator_loss` and
#   `losses.generator_loss` (target $\tfrac12$), each over the $2N$ stacked rows;
# * **GRL** (DANN): $L_D$ on `losses.grad_reverse(z, 1.0)`, one loss for both players.
#
# ($a$ is left out: with Adam and a loss that alone trains a parameter group, a constant factor hardly
# changes the steps.) We record both losses per row, the distance between the two clouds' means, and
# the angle still to turn. A Gaussian looks the same turned by $\pi$, so the angle gap is taken modulo
# $\pi$.

# %%
STEPS, N_TOY, LR = 1500, 256, 1e-2
TARGET_ANGLE = -0.9 - 0.5                                   # turns speech's axes onto text's


def angle_gap(angle: float) -> float:
    d = (angle - TARGET_ANGLE) % math.pi
    return min(d, math.pi - d)


def play(variant: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    G, D = RigidMap(), ToyDiscriminator()
    opt = torch.optim.Adam([*G.parameters(), *D.parameters()], lr=LR, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(seed + 1)
    lens, w = torch.ones(2 * N_TOY, dtype=torch.long), torch.ones(2 * N_TOY)
    y = torch.cat([torch.zeros(N_TOY), torch.ones(N_TOY)])  # N speech rows, then N text rows
    unit = rows_unit(2 * N_TOY)                             # divides the losses into per-row means
    hist = {"L_D": [], "L_G": [], "dist": [], "angle": []}
    for _ in range(STEPS):
        zs = G(sample(SPEECH, N_TOY, g))[:, None]           # (N, T=1, 2): one position per "sentence"
        zt = sample(TEXT, N_TOY, g)[:, None]
        z = torch.cat([zs, zt])                             # the 2N rows D scores
        if variant == "confusion":
            loss_d = L.discriminator_loss(D, z, lens, y, w)
            loss_g = L.generator_loss(D, z, lens, w)
            loss = 1.5 * loss_d + loss_g
        else:
            loss_d = L.modality_bce(D(L.grad_reverse(z, 1.0), lens), y, w)
            with torch.no_grad():                           # what L_G would read, for the plot only
                loss_g = L.generator_loss(D, z, lens, w)
            loss = loss_d
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist["L_D"].append(loss_d.item() / unit)
        hist["L_G"].append(loss_g.item() / unit)
        with torch.no_grad():                               # where G puts the speech cloud's centre
            hist["dist"].append(float((G(SPEECH[1][None])[0] - TEXT[1]).norm()))
        hist["angle"].append(angle_gap(G.angle.item()))
    return {"G": G, "D": D, **hist}


t0 = time.time()
toy_start = RigidMap()                                      # angle 0, shift 0: the speech cloud as it comes
runs = {v: play(v) for v in ("confusion", "GRL")}
print(f"played {STEPS} steps twice in {time.time() - t0:.1f} s")


def mean_last(xs: list, n: int = 200) -> float:
    return sum(xs[-n:]) / len(xs[-n:])


for v, r in runs.items():
    print(f"{v:9s} last 200 steps: L_D {mean_last(r['L_D']):.3f}, L_G {mean_last(r['L_G']):.3f} "
          f"(ln 2 = {math.log(2):.3f}); distance of the centres {mean_last(r['dist']):.2f} "
          f"(start {float((SPEECH[1] - TEXT[1]).norm()):.2f}); angle gap {r['angle'][-1]:.2f} rad")

# %% [markdown]
# What to see (in the figure below):
#
# * At the start D separates the clouds at once: $L_D$ falls towards 0 and $L_G$ rises far above $\ln 2$.
#   That pull moves the speech cloud across, and as the clouds overlap both losses approach $\ln 2$.
# * **GRL** keeps pushing the speech rows *towards the text label* as long as D gets anything right, and
#   ends with $L_D \approx \ln 2$: turned and placed onto the text cloud, D at chance. The distance
#   keeps swinging around a small value: a min-max game with simultaneous steps circles its equilibrium.
# * **Confusion** only pulls each row to where D reads $\sigma(\ell) = \tfrac12$, and its gradient
#   $\sigma(\ell) - \tfrac12$ fades as D grows unsure. In this toy it stops short: the clouds overlap
#   but stay a little apart, and $L_D$ stays below $\ln 2$ — the "spaces retain some differences" that the
#   S-Align summary reports from the paper's loss curves. This is one toy with one seed and one step
#   size, not a theorem: change `LR` or the clouds and watch the gap move.
#
# In the real model the same game runs on 256-dimensional mean-pooled encoder states, where the easiest
# way to make D unsure can be to make *every* sentence alike; the task losses are what stops that, and
# the README's measured `s-align` runs show how the balance falls out on this small budget.

# %%
def draw_cloud(ax, zs, zt, D=None, title=""):
    if D is not None:
        gx, gy = torch.meshgrid(torch.linspace(-5, 4.5, 120), torch.linspace(-3.5, 4, 100), indexing="xy")
        grid = torch.stack([gx, gy], -1).reshape(-1, 1, 2)
        with torch.no_grad():
            p = torch.sigmoid(D(grid, torch.ones(len(grid), dtype=torch.long))).reshape(gx.shape)
        im = ax.contourf(gx, gy, p, levels=torch.linspace(0, 1, 11).tolist(), cmap="RdBu_r", alpha=0.35)
        ax.contour(gx, gy, p, levels=[0.5], colors="k", linewidths=1.2, linestyles="--")
    ax.scatter(zt[:, 0], zt[:, 1], s=5, c="tab:orange", alpha=0.5, label="text")
    ax.scatter(zs[:, 0], zs[:, 1], s=5, c="tab:blue", alpha=0.5, label="speech")
    ax.set_xlim(-5, 4.5)
    ax.set_ylim(-3.5, 4)
    ax.set_aspect("equal")
    ax.set_xlabel("feature 1")
    ax.set_ylabel("feature 2")
    ax.set_title(title, fontsize=10)
    return im if D is not None else None


def smooth(xs, k=25):
    t = torch.tensor(xs)
    return torch.nn.functional.avg_pool1d(t[None, None], k, 1, padding=k // 2, count_include_pad=False)[0, 0][:len(xs)]


g = torch.Generator().manual_seed(7)
xs_show, xt_show = sample(SPEECH, 400, g), sample(TEXT, 400, g)
fig, axes = plt.subplots(2, 3, figsize=(15, 9.2))
steps = range(1, STEPS + 1)
for ax, v in zip(axes[0, :2], ("confusion", "GRL")):
    r = runs[v]
    ax.plot(steps, r["L_D"], color="tab:red", alpha=0.15, lw=0.7)
    ax.plot(steps, r["L_G"], color="tab:green", alpha=0.15, lw=0.7)
    ax.plot(steps, smooth(r["L_D"]), color="tab:red", label="$L_D$ (discriminator)")
    ax.plot(steps, smooth(r["L_G"]), color="tab:green",
            label="$L_G$ (confusion, towards 1/2)" + (" — trains G" if v == "confusion" else " — read only"))
    ax.axhline(math.log(2), color="k", ls="--", lw=1, label="ln 2: D at chance")
    ax.set_ylim(0, 2.0)
    ax.set_xlabel("step")
    ax.set_ylabel("BCE per row (axis cut at 2)")
    ax.set_title({"confusion": "confusion (S-Align code): G trained by $L_G$",
                  "GRL": "gradient reversal (DANN): G ascends $L_D$"}[v], fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
ax = axes[0, 2]
for v, c in (("confusion", "tab:purple"), ("GRL", "tab:brown")):
    ax.plot(steps, runs[v]["dist"], color=c, label=f"{v}: distance between the centres")
    ax.plot(steps, smooth(runs[v]["angle"]), color=c, ls=":", label=f"{v}: angle still to turn (rad)")
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("distance, angle (log scale)")
ax.set_title("how far the speech cloud is from the text cloud", fontsize=10)
ax.legend(fontsize=8, loc="lower left")
with torch.no_grad():
    draw_cloud(axes[1, 0], toy_start(xs_show), xt_show, title="before the game\nspeech and text apart")
    for ax, v in zip(axes[1, 1:], ("confusion", "GRL")):
        im = draw_cloud(ax, runs[v]["G"](xs_show), xt_show, runs[v]["D"],
                        title=f"after {STEPS} steps, {v}\nshading: D's P(text); dashed: P = 1/2")
axes[1, 0].legend(loc="lower left", markerscale=3)
fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8, label="D's probability of 'text'")
fig.suptitle("S-Align's adversarial game in 2-D: the speech cloud is moved (rotation + shift) until the "
             "discriminator cannot tell it from text", fontsize=12)
path = OUT / "adversarial_game.png"
fig.savefig(path, dpi=110, bbox_inches="tight")
print("wrote", path)
print(f"tutorial 04 ran in {time.time() - T_START:.0f} s")
