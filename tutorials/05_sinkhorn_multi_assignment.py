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
# # 5. Sinkhorn-Knopp and Multi-Assignment Sinkhorn-Knopp
#
# **Preserving Modality Structure Improves Multi-Modal Learning** (SSPC; Swetha et al., ICCV 2023) keeps
# each modality's structure while the modalities are aligned: every sample is described by a soft
# assignment to **several** learned anchors, and the assignment seen in one space must be predicted
# from the other. The assignments come from an optimal-transport solver, a **Multi-Assignment
# Sinkhorn-Knopp** (Multi-SK). Read next to `sinkhorn.py` and `docs/methods.md` ("SSPC").
#
# What this tutorial covers:
#
# 1. entropic optimal transport and the Sinkhorn-Knopp iteration (as in SwAV): marginals, equipartition;
# 2. the role of $\varepsilon$;
# 3. Multi-SK: $r$ anchors per sample, the official $K \times N \times K$ algorithm;
# 4. the exact reduction to $2 \times N \times K$ that the project trains with;
# 5. SSPC's anchors, queue and cost, adapted to speech and transcript.
#
# The SSPC paper's full text could not be read here; the algorithm follows the authors' code
# (`docs/methods.md`, "SSPC").

# %%
import math
import sys
import time
from pathlib import Path

try:
    ROOT = Path(__file__).resolve().parent.parent
except NameError:                         # in a notebook: the repository is the kernel's folder or one above it
    ROOT = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "sinkhorn.py").exists()), Path.cwd())
sys.path.insert(0, str(ROOT))

import matplotlib
if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import sinkhorn as SK

torch.manual_seed(0)
torch.set_num_threads(1)
OUT = ROOT / "runs" / "tutorials" / "05_sinkhorn_multi_assignment"
OUT.mkdir(parents=True, exist_ok=True)
T_START = time.time()
print("figures go to", OUT)

# %% [markdown]
# ## 1. Entropic optimal transport
#
# $N$ samples, $K$ prototypes (SwAV) or anchors (SSPC), and a score matrix $S \in \mathbb{R}^{N \times K}$
# (cosine similarities). Assigning every sample to its best-scoring prototype can put everyone on the
# same one: a collapse. Sinkhorn-Knopp instead finds a **transport plan** $Q$ that spends the same mass
# on every prototype (equipartition) and, among those, scores best, with an entropy term that keeps it soft:
#
# $$Q^\star = \arg\max_{Q \in \mathcal{U}}\ \langle Q, S \rangle + \varepsilon H(Q), \qquad
#   \mathcal{U} = \Big\{Q \ge 0:\ Q\mathbf{1}_K = \tfrac{1}{N}\mathbf{1}_N,\ Q^\top \mathbf{1}_N = \tfrac{1}{K}\mathbf{1}_K\Big\},
#   \qquad H(Q) = -\sum_{nk} Q_{nk}\log Q_{nk}.$$
#
# The solution has the form $Q^\star = \mathrm{diag}(u)\, e^{S/\varepsilon}\, \mathrm{diag}(v)$, and
# Sinkhorn-Knopp finds $u, v$ by fitting the two marginals in turn (columns first, then rows, as SwAV):
#
# $$v \leftarrow \frac{1/K}{\big(e^{S/\varepsilon}\big)^{\!\top} u}, \qquad u \leftarrow \frac{1/N}{e^{S/\varepsilon}\, v}.$$
#
# It is the same problem as POT's `ot.sinkhorn(1/N, 1/K, M=-S, reg=eps)` (a test checks the agreement).
# After each iteration the rows are exact; the columns approach $1/K$. `sinkhorn.sinkhorn_knopp` does this,
# in the log domain when $e^{S/\varepsilon}$ would leave the range of fp32; it runs under `no_grad`
# because its output is a *target*.

# %%
g = torch.Generator().manual_seed(0)
N, K = 12, 4
scores = 0.5 * torch.randn(N, K, generator=g)
scores[:, 0] += 0.6                                          # a "popular" prototype that scores high for everyone
print("argmax of the scores uses the prototypes", torch.bincount(scores.argmax(1), minlength=K).tolist(), "times")
Q = SK.sinkhorn_knopp(scores, eps=0.1, n_iters=200)
print("Sinkhorn plan: rows sum to", Q.sum(1)[:3].tolist(), "... (1/N =", 1 / N, ")")
print("               columns sum to", Q.sum(0).tolist(), "(1/K =", 1 / K, ")")
print("its argmax uses the prototypes", torch.bincount(Q.argmax(1), minlength=K).tolist(), "times")

# %% [markdown]
# ### Exercise 5.1: Sinkhorn-Knopp by hand
#
# Write `my_sinkhorn(scores, eps, n_iters)`: the plain-space iteration above, columns first then rows,
# starting from $u = \mathbf{1}$. Subtract the largest score before the exponential (it changes nothing
# in $Q$, and keeps `exp` in range). Return $Q$ of shape $(N, K)$.

# %%
def my_sinkhorn(scores: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """scores (N, K) -> the entropic OT plan Q (N, K), rows 1/N, columns 1/K."""
    ### BEGIN SOLUTION
    N, K = scores.shape
    kernel = torch.exp((scores - scores.max()) / eps)
    u = torch.ones(N)
    for _ in range(n_iters):
        v = (1.0 / K) / (kernel.T @ u)
        u = (1.0 / N) / (kernel @ v)
    return u[:, None] * kernel * v[None, :]
    ### END SOLUTION


# %% tags=["check"]
g = torch.Generator().manual_seed(51)
e = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
a = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
cos = e @ a.T                                                 # (40, 8) cosine scores
for eps, iters in ((0.5, 3), (0.1, 3), (0.1, 300)):
    mine, ref = my_sinkhorn(cos, eps, iters), SK.sinkhorn_knopp(cos, eps=eps, n_iters=iters, log_domain=False)
    assert mine.shape == (40, 8)
    assert torch.allclose(mine, ref, atol=1e-6), f"differs from sinkhorn.sinkhorn_knopp at eps {eps}, {iters} iterations"
    assert torch.allclose(mine.sum(1), torch.full((40,), 1 / 40), atol=1e-6), "rows must sum to 1/N exactly"
converged = my_sinkhorn(cos, 0.1, 300)
assert torch.allclose(converged.sum(0), torch.full((8,), 1 / 8), atol=1e-5), "columns must reach 1/K"
assert torch.allclose(my_sinkhorn(cos + 0.7, 0.1, 300), converged, atol=1e-6), "a constant shift changes nothing"
print("Exercise 5.1 passed: rows sum to 1/N, columns to 1/K, same plan as sinkhorn.sinkhorn_knopp")

# %% [markdown]
# ## 2. The role of $\varepsilon$
#
# $\varepsilon$ trades score against entropy:
#
# * $\varepsilon \to \infty$: the entropy wins, $Q \to \frac{1}{NK}$ everywhere: every sample is spread
#   evenly over every prototype, whatever the scores;
# * $\varepsilon \to 0$: the scores win, $Q$ tends to an optimal plan of the unregularised transport
#   problem, a corner of $\mathcal{U}$: as hard as the marginals allow (here each prototype must take
#   $N/K = 3$ samples whole);
# * the price of a small $\varepsilon$: $e^{S/\varepsilon}$ spans many orders of magnitude (hence the log
#   domain) and the iteration converges more slowly. SwAV runs 3 iterations at $\varepsilon = 0.05$;
#   SSPC's Multi-SK runs 20 at $\varepsilon = 0.07$.
#
# Below: the plan scaled by $N$ (each row then sums to 1: a sample's distribution over prototypes) at
# several $\varepsilon$, its entropy, and how far the columns still are from $1/K$ after 3 and after 20
# iterations.

# %%
EPS_SHOW = (2.0, 0.3, 0.1, 0.02)
plans = {eps: SK.sinkhorn_knopp(scores, eps=eps, n_iters=500) for eps in EPS_SHOW}
eps_grid = torch.logspace(-2, 1, 31).tolist()


def column_error(eps: float, iters: int) -> float:
    q = SK.sinkhorn_knopp(scores, eps=eps, n_iters=iters)
    return max(float((q.sum(0) * K - 1).abs().max()), 1e-8)    # 1e-8: below fp32's resolution, shown as the floor


entropy = [float(-(q * q.clamp_min(1e-30).log()).sum()) for q in
           (SK.sinkhorn_knopp(scores, eps=eps, n_iters=500) for eps in eps_grid)]
err3 = [column_error(eps, 3) for eps in eps_grid]
err20 = [column_error(eps, 20) for eps in eps_grid]
for eps in EPS_SHOW:
    q = plans[eps] * N
    print(f"eps {eps:5}: largest entry per row, averaged {float(q.max(1).values.mean()):.3f}; "
          f"entropy {float(-(plans[eps] * plans[eps].clamp_min(1e-30).log()).sum()):.3f} "
          f"(uniform: ln(NK) = {math.log(N * K):.3f}, hard: ln N = {math.log(N):.3f})")

fig, axes = plt.subplots(1, 6, figsize=(21, 5.2), gridspec_kw={"width_ratios": [1, 1, 1, 1, 1, 1.9], "wspace": 0.35})
hard = F.one_hot(scores.argmax(1), K).float()
panels = [("argmax of the scores\n(no balance)", hard)] + [(f"Sinkhorn, eps = {eps}", plans[eps] * N) for eps in EPS_SHOW]
for ax, (title, m) in zip(axes[:5], panels):
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    use = (m.sum(0) / N).tolist()
    ax.set_title(title, fontsize=11)
    ax.set_xticks(range(K))
    ax.set_xticklabels([f"{k}\n{u:.2f}" for k, u in enumerate(use)], fontsize=9)
    ax.set_xlabel("prototype\n(share of the mass)", fontsize=9)
    ax.set_yticks(range(0, N, 2))
axes[0].set_ylabel("sample")
fig.colorbar(im, ax=axes[:5].tolist(), shrink=0.8, pad=0.01, label="N x Q: mass of the sample on the prototype")
ax = axes[5]
ax.plot(eps_grid, entropy, color="tab:blue", label="entropy H(Q) at convergence (left axis)")
ax.axhline(math.log(N * K), color="tab:blue", ls=":", lw=1, label="ln(NK): uniform plan")
ax.axhline(math.log(N), color="tab:blue", ls="--", lw=1, label="ln N: hard assignment")
ax.set_xscale("log")
ax.set_xlabel("eps")
ax.set_ylabel("entropy of Q (nats)", color="tab:blue")
ax2 = ax.twinx()
ax2.plot(eps_grid, err3, color="tab:red", label="column error after 3 iterations (right axis)")
ax2.plot(eps_grid, err20, color="tab:red", ls="--", label="column error after 20 iterations (right axis)")
ax2.set_yscale("log")
ax2.set_ylim(1e-8, 3)
ax2.set_ylabel("max |K x column sum - 1|", color="tab:red")
h1, l1 = ax.get_legend_handles_labels()
h2, l2 = ax2.get_legend_handles_labels()
ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
ax.set_title("small eps: harder plans, slower convergence", fontsize=11)
fig.suptitle(f"Sinkhorn-Knopp on {N} samples x {K} prototypes; prototype 0 scores high for everyone. "
             "Under each column: the prototype's share of the mass (balanced: 1/K = 0.25)", fontsize=12, y=1.03)
path = OUT / "sinkhorn_eps.png"
fig.savefig(path, dpi=110, bbox_inches="tight")
plt.close(fig)
print("wrote", path)

# %% [markdown]
# The argmax gives prototype 0 most of the samples; every Sinkhorn plan gives each prototype a quarter
# of the mass. At $\varepsilon = 2$ the plan is nearly uniform; at $0.02$ it is nearly hard. Note that
# the balance is enforced on the *batch*: with few samples per prototype it is a strong constraint,
# which is why SSPC solves it over a queue of recent embeddings plus the batch.
#
# ## 3. Multi-Assignment Sinkhorn-Knopp
#
# Plain Sinkhorn spends **one** unit of mass per sample (scaled by $N$): with small $\varepsilon$ it picks
# one prototype. SSPC wants each sample to be described by **$r$ of the $K$ anchors**. The official
# algorithm builds a transport tensor over (slot $m$, sample $n$, anchor $k$) with $K$ slots, the last $r$
# of weight 1 and the others of weight 0.25:
#
# $$A_{mnk} \propto \exp\!\big(w_m S_{nk}/\varepsilon\big), \qquad
#   w_m = \begin{cases} 0.25 & m < K - r \\ 1 & m \ge K - r\end{cases}$$
#
# and repeats three normalisations:
#
# $$A_{mnk} \leftarrow A_{mnk}\,\frac{N/K}{\sum_{n'} A_{mn'k}} \quad\text{(each slot spreads } N/K \text{ on every anchor)}$$
# $$A_{mnk} \leftarrow \frac{A_{mnk}}{\sum_{m'} A_{m'nk}} \quad\text{(each sample-anchor pair is used once over all slots)}$$
# $$A_{mnk} \leftarrow \frac{A_{mnk}}{\sum_{k'} A_{mnk'}} \quad\text{(each slot of each sample is a distribution over anchors)}$$
#
# For one sample, $A_{:,n,:}$ tends to a $K \times K$ doubly stochastic matrix between slots and anchors (a
# soft permutation). The heavy slots take the anchors with the highest scores (the rearrangement
# inequality: pair the largest weights with the largest scores), so summing them,
#
# $$T_{nk} = \sum_{m \ge K-r} A_{mnk}, \qquad \sum_k T_{nk} = r, \qquad 0 \le T_{nk} \le 1, \qquad
#   \sum_n T_{nk} = \frac{rN}{K},$$
#
# gives a **soft top-$r$ set** per sample: $r$ units of mass, at most one per anchor, every anchor used
# equally. SSPC's target is $Y_{n\cdot} = \mathrm{minmax}(T_{n\cdot})$, scaled per row to $[0, 1]$.
# `sinkhorn.multi_assignment_sinkhorn_direct` is this algorithm as written; it returns $(Y, T, A)$.

# %%
g = torch.Generator().manual_seed(1)
e = F.normalize(torch.randn(64, 16, generator=g), dim=-1)
anchors = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
cos = e @ anchors.T                                           # (N 64, K 8)
Y, T, A = SK.multi_assignment_sinkhorn_direct(cos, r=3, n_iters=200)
print("A:", tuple(A.shape), "(slots, samples, anchors)")
print("slot rows sum to 1:     ", torch.allclose(A.sum(-1), torch.ones(8, 64), atol=1e-4))
print("slot columns sum to N/K:", torch.allclose(A.sum(1), torch.full((8, 8), 64 / 8), rtol=1e-3))
print("each (n, k) used once:  ", torch.allclose(A.sum(0), torch.ones(64, 8), atol=1e-4))
print("T rows sum to r = 3:    ", T.sum(1)[:4].tolist())
print("T columns sum to rN/K = 24:", [round(v, 3) for v in T.sum(0).tolist()])
print("largest T entry:", float(T.max()), "(at most 1)")
print("Y of sample 0:", [round(v, 2) for v in Y[0].tolist()], "<- three anchors near 1")

# %% [markdown]
# ## 4. The exact two-slot reduction
#
# The tensor has $K \cdot N \cdot K$ entries: at $N = 4096$ and $K = 256$ that is a gigabyte. But slots of
# equal weight start equal ($\exp(w_m S/\varepsilon)$ depends on $m$ only through $w_m$), and every
# normalisation keeps them equal: the column step and the row step act on each slot alone, and the
# slot-sum step divides every slot of an $(n, k)$ pair by the same number. So the $K$ slots are two
# distinct slices, a light one $A^{\text{low}}$ with multiplicity $K - r$ and a heavy one $A^{\text{high}}$
# with multiplicity $r$, and the slot sum becomes
#
# $$\sum_m A_{mnk} = (K - r)\,A^{\text{low}}_{nk} + r\,A^{\text{high}}_{nk}, \qquad T = r\,A^{\text{high}}.$$
#
# `sinkhorn.multi_assignment_sinkhorn` iterates on a $(2, N, K)$ tensor: the same result, $K/2$ times
# less memory (`docs/methods.md`, "SSPC: the two-slot reduction"). (This holds for the two slot weights
# of the official "discrete" mode; its unused ramped mode has $K$ distinct weights.)
#
# ### Exercise 5.2: Multi-SK on two slots
#
# Write `two_slot_T(scores, r, eps, n_iters, low_weight)`: the three normalisations on a $(2, N, K)$
# tensor with the multiplicities above, the final row normalisation, and $T = r A^{\text{high}}$.
# Start from $\exp(w\,S/\varepsilon)$ with each slot's own maximum subtracted, normalised to total mass 1
# counting the multiplicities, and add 1e-5 to every denominator inside the loop, as the official code does.

# %%
def two_slot_T(scores: torch.Tensor, r: int, eps: float = 0.07, n_iters: int = 20,
               low_weight: float = 0.25) -> torch.Tensor:
    """scores (N, K) -> T (N, K): the soft top-r assignment, rows summing to r."""
    ### BEGIN SOLUTION
    N, K = scores.shape
    w = torch.tensor([low_weight, 1.0])[:, None, None]
    mult = torch.tensor([K - r, r], dtype=torch.float)[:, None, None]
    log_a = w * scores[None] / eps                            # (2, N, K)
    a = torch.exp(log_a - log_a.amax(dim=(1, 2), keepdim=True))
    a = a / (mult * a).sum()
    for _ in range(n_iters):
        a = a * ((N / K) / (a.sum(1, keepdim=True) + 1e-5))  # per slot: N/K on every anchor
        a = a / ((mult * a).sum(0, keepdim=True) + 1e-5)      # per (n, k): once over all K slots
        a = a / (a.sum(2, keepdim=True) + 1e-5)               # per (slot, n): a distribution
    a = a / a.sum(2, keepdim=True)
    return r * a[1]
    ### END SOLUTION


# %% tags=["check"]
g = torch.Generator().manual_seed(52)
e = F.normalize(torch.randn(96, 16, generator=g), dim=-1)
anc = F.normalize(torch.randn(12, 16, generator=g), dim=-1)
cos = e @ anc.T
for r, iters in ((3, 20), (6, 20), (3, 300)):
    mine = two_slot_T(cos, r, n_iters=iters)
    _, T_direct, _ = SK.multi_assignment_sinkhorn_direct(cos, r, n_iters=iters)
    assert mine.shape == (96, 12)
    assert (mine - T_direct).abs().max() < 1e-5, f"differs from the K x N x K algorithm (r {r}, {iters} iterations)"
    assert torch.allclose(mine.sum(1), torch.full((96,), float(r)), atol=1e-4), "rows of T must sum to r"
    assert mine.max() <= 1 + 1e-5, "an anchor takes at most one unit per sample"
assert torch.allclose(two_slot_T(cos, 3, n_iters=300).sum(0), torch.full((12,), 3 * 96 / 12), rtol=1e-3)
print("Exercise 5.2 passed: two slots give the K-slot algorithm's T; rows r, columns rN/K")

# %% [markdown]
# How much the reduction saves, at SSPC's sizes for a queue of 512 (K = 64, r = 32, 20 iterations). The
# times are wall-clock on one thread of whatever machine runs this (other processes may share it).

# %%
g = torch.Generator().manual_seed(2)
cos = F.normalize(torch.randn(512, 32, generator=g), dim=-1) @ F.normalize(torch.randn(64, 32, generator=g), dim=-1).T
t0 = time.perf_counter()
Y_direct, T_direct, A_direct = SK.multi_assignment_sinkhorn_direct(cos, 32)
t_direct = time.perf_counter() - t0
t0 = time.perf_counter()
Y_two, T_two, A_two = SK.multi_assignment_sinkhorn(cos, 32)
t_two = time.perf_counter() - t0
print(f"direct: tensor {tuple(A_direct.shape)}, {t_direct * 1e3:.0f} ms; two slots: tensor {tuple(A_two.shape)}, "
      f"{t_two * 1e3:.1f} ms ({t_direct / t_two:.0f}x faster); max |Y difference| {float((Y_direct - Y_two).abs().max()):.1e}")

# %% [markdown]
# ## 5. SSPC's anchors, queue and cost
#
# In SSPC each modality $m$ has learnable anchors, one set per space (`sinkhorn.Anchors`: $K$ vectors,
# $\mathcal{N}(0, 1)$ at start, L2-normalised at every use), scored by cosine: $P = e\,\hat{A}^\top \in [-1, 1]^{B \times K}$.
# Targets come from Multi-SK over a **queue** of recent detached embeddings plus the batch
# (`sinkhorn.EmbeddingQueue`; the loss is off until it has filled once), and only the batch's rows are kept.
# The cost, as the official code writes it, is a binary cross-entropy on $\exp(P/\tau)$, $\tau = 0.1$:
#
# $$\ell(P, Y) = \frac{1}{BK}\sum_{b,k} \mathrm{BCE}\big(e^{P_{bk}/\tau},\, Y_{bk}\big).$$
#
# Because $e^{x} > 0$, the predicted probability $\sigma(e^{P/\tau})$ is always above $\tfrac12$: an
# anchor whose target is 0 costs at least $\ln 2$ whatever $P$, so $\ell \ge \ln 2 \cdot \overline{(1 - Y)}$
# (`docs/methods.md`, "SSPC: the consistency loss"), a quirk kept for fidelity (`sspc_cost(kind="bce")`
# and `"ce"` are cleaner options).
#
# In the speech-translation adaptation (`docs/methods.md`, "SSPC: speech and transcript") the modalities
# are speech $s$ and transcript $x$; the input space is the pooled low-level states, the joint space the
# pooled shared-encoder states, and the 8 terms of `sinkhorn.SSPC` ask each space's anchor scores to
# predict the other space's Multi-SK assignment: $\ell\big(\cos(e^{\text{in}}_m, A^{\text{in}}_m),\, Y[\cos(e^{\text{j}}_n, A^{\text{j}}_m)]\big)$ and
# $\ell\big(\cos(e^{\text{j}}_m, A^{\text{j}}_n),\, Y[\cos(e^{\text{in}}_n, A^{\text{in}}_n)]\big)$ for $m, n \in \{s, x\}$.
#
# ### Exercise 5.3: the SSPC cost, as coded
#
# Write `sspc_code_cost(P, Y, tau)`: the mean over all $B \cdot K$ entries of
# $\mathrm{BCE}(e^{P/\tau}, Y)$, using `F.logsigmoid` (not `F.binary_cross_entropy_with_logits`).

# %%
def sspc_code_cost(P: torch.Tensor, Y: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """P (B, K) cosine scores in [-1, 1], Y (B, K) targets in [0, 1] -> scalar."""
    ### BEGIN SOLUTION
    logit = torch.exp(P / tau)
    return -(Y * F.logsigmoid(logit) + (1 - Y) * F.logsigmoid(-logit)).mean()
    ### END SOLUTION


# %% tags=["check"]
g = torch.Generator().manual_seed(53)
P = torch.rand(10, 16, generator=g) * 2 - 1
Yt = SK.multi_assignment_sinkhorn(torch.rand(10, 16, generator=g), r=4, n_iters=50)[0]
assert torch.allclose(sspc_code_cost(P, Yt), SK.sspc_cost(P, Yt, kind="code"), atol=1e-6), "not sinkhorn.sspc_cost"
# the floor: sigma(exp(.)) > 1/2, so every zero target costs at least ln 2
for Pc in (P, torch.full_like(P, -1.0), torch.full_like(P, 1.0)):
    assert sspc_code_cost(Pc, Yt) >= math.log(2) * (1 - Yt).mean() - 1e-6
# near the floor when the scores are -1 for every anchor and every target is 0
assert abs(sspc_code_cost(torch.full_like(P, -1.0), torch.zeros_like(P)) - math.log(2)) < 1e-4
print("Exercise 5.3 passed: the coded SSPC cost, and its floor ln 2 * mean(1 - Y)")

# %% [markdown]
# `sinkhorn.SSPC` on pooled embeddings of a toy batch: the loss stays 0 (switched off) until all four
# queues have received `queue` rows, while the anchors' usage entropy (of the Multi-SK targets, averaged
# over the batch) shows whether the anchors are used evenly ($\ln K$ at best).

# %%
torch.manual_seed(3)
d, Kq, Bq = 16, 8, 16
sspc = SK.SSPC(dim=d, k=Kq, r=3, queue=48)
for it in range(5):
    e_in = {"s": torch.randn(Bq, d, requires_grad=True), "x": torch.randn(Bq, d, requires_grad=True)}
    e_j = {"s": torch.randn(Bq, d, requires_grad=True), "x": torch.randn(Bq, d, requires_grad=True)}
    loss, logs = sspc(e_in, e_j)
    print(f"batch {it}: pushed {int(sspc.queue_in['s'].pushed):3d} of 48 rows, on {logs['sspc_on']:.0f}, "
          f"loss {loss.item():.3f} (intra {logs['sspc_intra']:.3f} + cross {logs['sspc_cross']:.3f}), "
          f"anchor entropy {logs['anchor_entropy']:.3f} of ln K = {math.log(Kq):.3f}")
loss.backward()
print("gradients reach the anchors:", sspc.anchors_in["s"].weight.grad is not None,
      "and the embeddings:", e_in["s"].grad is not None, "; the queues are buffers:",
      not any(p is sspc.queue_in["s"].rows for p in sspc.parameters()))

# %% [markdown]
# ## 6. Multi-SK against plain Sinkhorn on a planted problem
#
# A problem with a known answer: $N = 128$ samples, $K = 16$ anchors, $r = 4$;
# sample $n$ prefers the anchors $\{(n + j) \bmod K : j < r\}$ (score 0.8, the others $-0.2$, plus noise of
# standard deviation 0.05). On top, anchors 0-3 get a **popularity offset** of $+1.2$ for every sample, so
# that a plain top-$r$ of the scores would hand them to everyone. Three ways to pick $r$ anchors per sample:
#
# * **top-$r$ of the scores**: no balance, the popular anchors win;
# * **plain Sinkhorn** (`sinkhorn_knopp`, $\varepsilon = 0.07$): balanced, but one unit of mass per sample;
# * **Multi-SK** (`multi_assignment_sinkhorn`, $\varepsilon = 0.07$, $r = 4$): balanced, $r$ units, at most one per anchor.
#
# An offset that is the same for every sample of an anchor does not change a plan whose anchor totals
# are fixed: $\sum_{nk} Q_{nk}(S_{nk} + b_k) = \langle Q, S\rangle + \sum_k b_k\,\tfrac1K$. Both Sinkhorns
# are blind to it at convergence. (With an offset this large the official 1e-5 guards slow Multi-SK
# down, so this section runs 200 iterations instead of 20; the gap after 20 is printed.)

# %%
Np, Kp, rp = 128, 16, 4
g = torch.Generator().manual_seed(4)
n_idx, k_idx = torch.arange(Np)[:, None], torch.arange(Kp)[None]
planted = ((k_idx - n_idx) % Kp) < rp                         # (N, K) the true top-r sets
clean = torch.where(planted, 0.8, -0.2) + 0.05 * torch.randn(Np, Kp, generator=g)
offset = torch.zeros(Kp)
offset[:4] = 1.2
S_p = clean + offset                                          # what the solvers see
Y_m, T_m, _ = SK.multi_assignment_sinkhorn(S_p, rp, eps=0.07, n_iters=200)
Q_p = SK.sinkhorn_knopp(S_p, eps=0.07, n_iters=200) * Np       # rows sum to 1
gap20 = float((SK.multi_assignment_sinkhorn(S_p, rp, n_iters=20)[0] - SK.multi_assignment_sinkhorn(clean, rp, n_iters=20)[0]).abs().max())
gap200 = float((Y_m - SK.multi_assignment_sinkhorn(clean, rp, n_iters=200)[0]).abs().max())
print(f"Multi-SK with vs without the offset: max |Y difference| {gap20:.3f} after 20 iterations, {gap200:.1e} after 200")


def top_r_mask(m: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(m, dtype=torch.bool).scatter_(1, m.topk(rp, dim=1).indices, True)


choices = {"top-r of the scores": top_r_mask(S_p), "plain Sinkhorn, top-r": top_r_mask(Q_p),
           "Multi-SK, top-r": top_r_mask(T_m)}
for name, m in choices.items():
    exact = float((m == planted).all(1).float().mean())
    print(f"{name:22s} recovers the planted set for {100 * exact:5.1f} % of samples; "
          f"anchor use min/max {int(m.sum(0).min())}/{int(m.sum(0).max())} (balanced: rN/K = {rp * Np // Kp})")
prof_q = Q_p.sort(1, descending=True).values.mean(0)
prof_t = T_m.sort(1, descending=True).values.mean(0)
print("mean sorted row, plain Sinkhorn x N:", [round(v, 3) for v in prof_q[:6].tolist()])
print("mean sorted row, Multi-SK T:        ", [round(v, 3) for v in prof_t[:6].tolist()])

# %% [markdown]
# Both Sinkhorns find the planted sets despite the offset, and use every anchor equally; the plain top-$r$
# gives anchors 0-3 to everyone. The difference between the two Sinkhorns is the *shape* of a row: plain
# Sinkhorn spends one unit, unevenly, over the four good anchors (a distribution, whose top entry would be
# SwAV's single code); Multi-SK gives each of them nearly a full unit, the $r$-hot target that SSPC's
# multi-label cost needs. The figure shows it on the first 32 samples.

# %%
rows = slice(0, 32)
fig = plt.figure(figsize=(18, 8.6))
gs = fig.add_gridspec(2, 4, width_ratios=[1, 1, 1, 1.25], hspace=0.45, wspace=0.3)
heat = [("scores S (offset +1.2 on anchors 0-3)", S_p, "coolwarm", (-1.5, 1.5)),
        ("top-r of the scores", choices["top-r of the scores"].float(), "Greys", (0, 1)),
        ("plain Sinkhorn: N x Q (rows sum to 1)", Q_p, "viridis", (0, 1)),
        ("Multi-SK: T (rows sum to r = 4)", T_m, "viridis", (0, 1))]
pr, pc = planted[rows].nonzero(as_tuple=True)
for i, (title, m, cmap, (lo, hi)) in enumerate(heat):
    ax = fig.add_subplot(gs[i // 2, i % 2])
    im = ax.imshow(m[rows], cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    ax.scatter(pc, pr, s=6, marker="s", facecolors="none", edgecolors="tab:red", linewidths=0.6,
               label="planted top-r set")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("anchor")
    ax.set_ylabel("sample")
    fig.colorbar(im, ax=ax, shrink=0.85)
    if i == 0:
        ax.legend(loc="lower left", fontsize=7, framealpha=0.9)
ax = fig.add_subplot(gs[0, 2:])
width = 0.27
for j, (name, m) in enumerate(choices.items()):
    ax.bar(torch.arange(Kp) + (j - 1) * width, m.sum(0), width, label=name)
ax.axhline(rp * Np / Kp, color="k", ls="--", lw=1, label="balanced use rN/K = 32")
ax.set_xlabel("anchor")
ax.set_ylabel("samples that pick the anchor")
ax.set_xticks(range(Kp))
ax.set_title("anchor use: the plain top-r collapses onto the popular anchors 0-3", fontsize=10)
ax.legend(fontsize=8)
ax = fig.add_subplot(gs[1, 2:])
ranks = torch.arange(1, Kp + 1)
ax.plot(ranks, prof_q, "o-", label="plain Sinkhorn, N x Q: one unit per sample")
ax.plot(ranks, prof_t, "s-", label=f"Multi-SK, T: r = {rp} units, at most 1 per anchor")
ax.plot(ranks, Y_m.sort(1, descending=True).values.mean(0), "^:", label="Multi-SK target Y = minmax(T)")
ax.axvline(rp + 0.5, color="grey", ls=":", lw=1)
ax.text(rp + 0.7, 0.55, f"r = {rp}", color="grey")
ax.set_xlabel("anchor rank within a sample's row (1 = largest)")
ax.set_ylabel("assignment, averaged over samples")
ax.set_xticks(ranks)
ax.set_title("Multi-SK assigns r anchors fully; plain Sinkhorn splits one unit", fontsize=10)
ax.legend(fontsize=8)
fig.suptitle(f"Multi-Assignment Sinkhorn-Knopp vs plain Sinkhorn-Knopp ({Np} samples, {Kp} anchors, r = {rp}, "
             "eps = 0.07); red squares: the planted sets", fontsize=12)
path = OUT / "multi_sk_vs_sk.png"
fig.savefig(path, dpi=110, bbox_inches="tight")
print("wrote", path)
print(f"tutorial 05 ran in {time.time() - T_START:.0f} s")
