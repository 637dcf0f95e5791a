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
# # 6. Train, decode, evaluate
#
# The last mile: the objective that `train.py` minimises, the search that turns a trained model into
# sentences, and the numbers that say how good those sentences are. Read next to `train.py`
# (`objective`, `train`), `model.py` (section 6, generation), `evaluate.py` and `docs/methods.md`
# ("Objective", "ConST: hyper-parameters").
#
# What this tutorial covers:
#
# 1. ConST's Eq. 1 as **one weighted sum** (`train.objective`), each term logged on its own;
# 2. a short training run on a demo corpus: MT pre-training, then ST + ASR + MT + CTC + ConST's
#    contrastive term, with every term's curve;
# 3. decoding: greedy and **beam search**, with and without the **KV cache** (timed);
# 4. evaluation: **BLEU** with its sacreBLEU **signature**, why BLEU computed on SentencePiece pieces is
#    not BLEU, and **WER** for ASR. The last figure: the loss curves and BLEU against the beam size.
#
# The budget is a few minutes on one CPU core: the `tiny` model trains for a few hundred steps, so the
# translations are poor. The point is the machinery, not the scores.

# %%
import math
import shutil
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
import sacrebleu
import torch

import data
import demo_corpus
import evaluate
import losses as L
import model as M
import train

torch.manual_seed(0)
torch.set_num_threads(1)
OUT = ROOT / "runs" / "tutorials" / "06_train_decode_evaluate"
OUT.mkdir(parents=True, exist_ok=True)
T_START, CPU_START = time.time(), time.process_time()
print("figures, the demo corpus and the runs go to", OUT)

# %% [markdown]
# ## 1. The objective: ConST Eq. 1 as one weighted sum
#
# On every batch of triplets (speech $s$, transcript $x$, translation $y$) the model is trained on three
# tasks with one decoder, plus the alignment term of the recipe (ConST Eq. 1):
#
# $$\mathcal{L} = \mathcal{L}_{ST} + \mathcal{L}_{ASR} + \mathcal{L}_{MT} + \lambda\,\mathcal{L}_{CTR},
# \qquad \mathcal{L}_{ST} = -\sum_n \log P(y_n \mid s_n),\;
# \mathcal{L}_{ASR} = -\sum_n \log P(x_n \mid s_n),\; \mathcal{L}_{MT} = -\sum_n \log P(y_n \mid x_n).$$
#
# How `train.objective` writes it (`docs/methods.md`, "Objective: the weighted sum in train.objective"):
#
# * each task term is a **label-smoothed** cross-entropy (`losses.label_smoothed_cross_entropy`,
#   $\varepsilon = 0.1$): $(1-\varepsilon)\,(-\log p_{y_t}) + \frac{\varepsilon}{V}\sum_{w}(-\log p_w)$,
#   **summed** over the target tokens; position 0 (the language tag, which is forced at decoding time)
#   carries no loss;
# * the CPU demo adds a CTC term from the speech to the transcript (`losses.ctc_loss`, weight 1; ConST's
#   released recipe has it off), whose head reads the length adaptor's output scaled by $\sqrt{d}$, without
#   positional embeddings, as the released code's `ctc_cnn` (`net.ctc_states`); `const` adds $\lambda = 1.5$ times
#   `losses.contrastive_loss` (tutorial 3);
# * the **whole sum is divided by the number of ST target tokens** $N_{tgt}$ of the batch, as the
#   official code does, so the papers' weights carry over unchanged:
#
# $$\mathcal{L}_{\text{batch}} = \frac{1}{N_{tgt}}\Big(w_{ST}\,\mathcal{L}_{ST} + w_{ASR}\,\mathcal{L}_{ASR}
#   + w_{MT}\,\mathcal{L}_{MT} + w_{CTC}\,\mathcal{L}_{CTC} + \lambda\,\mathcal{L}_{CTR}\Big).$$
#
# `train.objective(cfg, model, batch, tasks)` returns that loss and a dict of each term divided by
# $N_{tgt}$ (before its weight): what `train.py` logs and what the curves below show.

# %%
t0 = time.time()
corpus = demo_corpus.write_demo_corpus(OUT / "demo_corpus",
                                       demo_corpus.DemoConfig(train=64, dev=8, test=64, talk_size=16, seed=2,
                                                              workers=1), verbose=False)
VOCAB_SIZE = 300                         # a joint SentencePiece model of 64 sentence pairs: a small one
vocab = data.build_vocab(corpus, VOCAB_SIZE, verbose=False)
train_ds = data.MustcSplit(corpus, "train", vocab, verbose=False)
test_ds = data.MustcSplit(corpus, "tst-COMMON", vocab, verbose=False)
print(f"demo corpus in {time.time() - t0:.1f} s: train {len(train_ds)} segments ({train_ds.hours * 60:.1f} min of "
      f"speech), tst-COMMON {len(test_ds)}; vocabulary {len(vocab)} pieces")

cfg = train.TrainConfig(recipe="const", ctr_weight=1.5, ctr_tau=0.02, data=str(corpus), vocab_size=VOCAB_SIZE,
                        bf16="false")
batch = data.collate([train_ds[i] for i in range(8)])
torch.manual_seed(0)
net = M.SpeechTranslator(train.model_config(cfg, len(vocab))).eval()   # eval: no dropout, so two calls agree
TASKS = ("st", "asr", "mt")
with torch.no_grad():
    loss, logged = train.objective(cfg, net, batch, TASKS)
n_tgt = int(batch.tgt_lens.sum())
weights = {"st": cfg.st_weight, "asr": cfg.asr_weight, "mt": cfg.mt_weight, "ctc": cfg.ctc_weight,
           "ctr": cfg.ctr_weight}
print(f"untrained model, a batch of {len(batch)}: N_tgt = {n_tgt} target tokens; loss = {loss.item():.4f}")
for k, w in weights.items():
    print(f"  {k:4s} weight {w:3.1f} x {logged[k]:8.4f} (its sum / N_tgt)")
print(f"  weighted sum of the logged terms: {sum(w * logged[k] for k, w in weights.items()):.4f}"
      f"   (above ln V = {math.log(len(vocab)):.2f}, a uniform guess: an untrained model is confidently wrong)")

# %% [markdown]
# ### Exercise 6.1: Eq. 1 from its pieces
#
# Recompute `train.objective`'s loss for the `const` recipe from the model's outputs and the loss
# functions of `losses.py`. You need:
#
# * `out = net(batch, TASKS, reencode_asr=cfg.reencode_asr)`: `out.logits[task]` and `out.targets[task]`
#   for the three tasks, the low-level speech states `out.speech_low` with lengths `out.speech_lens`, and the
#   length adaptor's output `out.speech_subsampled` (the same states before $\sqrt{d}$ and positions);
# * `L.label_smoothed_cross_entropy(logits, targets, eps)` returns `(sum, nll_sum, n_tokens)`;
# * `L.ctc_loss(net.ctc_states(out.speech_subsampled), out.speech_lens, net.embed_tokens.weight, batch.src,
#   batch.src_lens)`;
# * `L.contrastive_loss(u, v, tau)` with $u$ the mean-pooled `out.speech_low` and $v$ the mean-pooled
#   `net.encode_text(batch.src, batch.src_lens)` states (`M.masked_mean`);
# * the weights in `cfg`, and $N_{tgt}$ = `batch.tgt_lens.sum()`.

# %%
def eq1(cfg: train.TrainConfig, net: M.SpeechTranslator, batch: data.Batch) -> torch.Tensor:
    """ConST Eq. 1 as train.objective computes it, for ST + ASR + MT + CTC + contrastive."""
    ### BEGIN SOLUTION
    out = net(batch, TASKS, reencode_asr=cfg.reencode_asr)
    ce = {t: L.label_smoothed_cross_entropy(out.logits[t], out.targets[t], cfg.label_smoothing)[0] for t in TASKS}
    ctc = L.ctc_loss(net.ctc_states(out.speech_subsampled), out.speech_lens, net.embed_tokens.weight, batch.src,
                     batch.src_lens)
    u = M.masked_mean(out.speech_low, out.speech_lens)
    v = M.masked_mean(*net.encode_text(batch.src, batch.src_lens))
    ctr = L.contrastive_loss(u, v, cfg.ctr_tau)
    total = (cfg.st_weight * ce["st"] + cfg.asr_weight * ce["asr"] + cfg.mt_weight * ce["mt"]
             + cfg.ctc_weight * ctc + cfg.ctr_weight * ctr)
    return total / batch.tgt_lens.sum()
    ### END SOLUTION


# %% tags=["check"]
with torch.no_grad():
    for _weights in ({}, {"st_weight": 0.5, "mt_weight": 2.0, "ctc_weight": 0.0, "ctr_weight": 3.0}):
        _cfg = train.TrainConfig(**{**cfg.__dict__, **_weights})
        _mine, (_theirs, _) = eq1(_cfg, net, batch), train.objective(_cfg, net, batch, TASKS)
        assert torch.allclose(_mine, _theirs, rtol=1e-5), (_weights, _mine.item(), _theirs.item())
print(f"Exercise 6.1 passed: Eq. 1 by hand = train.objective ({_mine.item():.4f} with other weights too)")

# %% [markdown]
# ## 2. Decoding: greedy search, beam search and the KV cache
#
# The decoder starts from `</s> <lang:xx>`: the language tag is **forced** (ConST's `--prefix-size 1`),
# so one decoder serves ST (`<lang:de>`) and ASR (`<lang:en>`). Each step appends the next token:
#
# * **greedy**: the most likely token, until `</s>` or a maximum length $a\,T + b$ ($a = 1.2$,
#   $b = 10$; $T$ = encoder frames);
# * **beam search** (`model.generate`): keep the $K$ best prefixes by summed log-probability; a
#   finished hypothesis is ranked by $\log P(y) / |y|^{\alpha}$ (length penalty $\alpha$; ConST uses
#   beam 10 and $\alpha = 0.7$ for German).
#
# Without a cache, step $t$ runs the decoder over the whole prefix again: $O(t)$ positions per step,
# $O(t^2)$ per sentence. The **KV cache** keeps every layer's self-attention keys and values of the
# positions already decoded and computes the cross-attention keys and values of the encoder states
# once, so a step feeds only the newest token. Same numbers, less work.
#
# ### Exercise 6.2: greedy search without a cache
#
# Write `greedy_no_cache(net, enc, enc_lens, lang_id, max_len)` for one utterance (batch of 1): start
# from `[[data.EOS_ID, lang_id]]`; at step $k = 0, 1, \dots$ run `net.decode(tokens, enc, enc_lens)` on
# the whole prefix and take the arg-max of the last position's logits (never `<pad>`); if $k + 1 \ge$
# `max_len`, take `</s>` instead; stop at `</s>`. Return the list of tokens produced, without the tag
# and without `</s>`.

# %%
@torch.no_grad()
def greedy_no_cache(net: M.SpeechTranslator, enc: torch.Tensor, enc_lens: torch.Tensor, lang_id: int,
                    max_len: int) -> list:
    """enc (1, T, D), enc_lens (1,) -> token ids of the greedy hypothesis."""
    ### BEGIN SOLUTION
    tokens = torch.tensor([[data.EOS_ID, lang_id]])
    out = []
    for k in range(max_len):
        logits = net.decode(tokens, enc, enc_lens)[0, -1]
        logits[data.PAD_ID] = float("-inf")
        nxt = data.EOS_ID if k + 1 >= max_len else int(logits.argmax())
        if nxt == data.EOS_ID:
            break
        out.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
    return out
    ### END SOLUTION


# %% tags=["check"]
with torch.no_grad():
    for _i in (0, 3):
        _b = data.collate([test_ds[_i]])
        _enc_lens = net.encode_speech(_b.audio, _b.audio_lens)[1]
        _enc = net.encode(*net.encode_speech(_b.audio, _b.audio_lens))
        _lang = vocab.lang_id("de")
        _max_len = int(1.2 * _enc_lens.item() + 10)
        _mine = greedy_no_cache(net, _enc, _enc_lens, _lang, _max_len)
        assert _mine == net.greedy(_enc, _enc_lens, _lang)[0], "differs from model.greedy (KV cache)"
        assert _mine == net.generate(_enc, _enc_lens, _lang, beam=1)[0], "differs from beam search with beam 1"
print(f"Exercise 6.2 passed: the same {len(_mine)} tokens as model.greedy and model.generate(beam=1) "
      f"(an untrained model runs to the length limit, {_max_len - 1} tokens)")

# %% [markdown]
# ## 3. Evaluation: WER, and BLEU with its signature
#
# **WER** (ASR): the word-level edit distance (substitutions + insertions + deletions) between the
# hypothesis and the reference, summed over the test set and divided by the number of reference words.
# `evaluate.wer` lowercases and removes punctuation first (`evaluate.normalize_for_wer`). Insertions
# count, so WER can exceed 100 %.
#
# ### Exercise 6.3: word error rate
#
# Write `word_error_rate(hyps, refs)` in %, with your own Levenshtein distance over word lists and
# `evaluate.normalize_for_wer` for the normalisation.

# %%
def word_error_rate(hyps: list, refs: list) -> float:
    """Corpus WER in %: sum of word edit distances / sum of reference lengths, after normalisation."""
    ### BEGIN SOLUTION
    def distance(a: list, b: list) -> int:
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, y in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
        return row[-1]
    edits = sum(distance(evaluate.normalize_for_wer(h), evaluate.normalize_for_wer(r)) for h, r in zip(hyps, refs))
    return 100.0 * edits / max(sum(len(evaluate.normalize_for_wer(r)) for r in refs), 1)
    ### END SOLUTION


# %% tags=["check"]
_refs = ["The cat sat on the mat.", "Is it raining?", "I don't know what you mean"]
assert word_error_rate(_refs, _refs) == 0.0
assert word_error_rate(["the cat sat on the mat", "is it raining", "i don't know what you mean"], _refs) == 0.0
assert abs(word_error_rate(["The cat sat on a mat.", "", "I know what you mean mean"], _refs)
           - 100 * (1 + 3 + 2) / 15) < 1e-9          # 1 substitution; 3 deletions; 1 deletion + 1 insertion
assert word_error_rate(["yes yes yes yes yes"], ["no"]) == 500.0   # insertions: WER above 100 %
_g = torch.Generator().manual_seed(6)
_words = ["a", "b", "c", "d", "e"]
_rand = [" ".join(_words[j] for j in torch.randint(0, 5, (int(n),), generator=_g))
         for n in torch.randint(0, 9, (40,), generator=_g)]
assert abs(word_error_rate(_rand[:20], _rand[20:]) - evaluate.wer(_rand[:20], _rand[20:])) < 1e-9
_a, _b = [s.src for s in train_ds.segments[:20]], [s.src for s in train_ds.segments[20:40]]
assert abs(word_error_rate(_a, _b) - evaluate.wer(_a, _b)) < 1e-9
print("Exercise 6.3 passed: equals evaluate.wer; 0 on a match up to case and punctuation; above 100 % with insertions")

# %% [markdown]
# ## 4. A short training run, every term logged
#
# A few CPU minutes cannot teach the `tiny` model to translate *unseen* sentences (the main job,
# `python train.py`, needs about 17 minutes on two cores for that). So we do what a plumbing test does:
# train on **64 segments**, without dropout, until the model has learned them, and do the decoding and
# scoring on those segments. Every number below says *which* segments it was measured on; on the 64
# unseen test segments the same model scores near zero, and we print that too.
#
# The recipe is `const`: ST + ASR + MT + CTC + $1.5\,\mathcal{L}_{CTR}$ (section 1). `train.train` returns
# `history`, one dict per step with every term of the weighted sum divided by $N_{tgt}$, as in `log.jsonl`.

# %%
RUN = OUT / "run"
shutil.rmtree(RUN, ignore_errors=True)              # train.py appends to log.jsonl: start clean
STEPS = 200
run_cfg = train.TrainConfig(recipe="const", ctr_weight=1.5, ctr_tau=0.02, preset="tiny", data=str(corpus),
                            vocab_size=VOCAB_SIZE, dropout=0.0, batch_seconds=60.0, max_sentences=32, lr=3e-3,
                            warmup=30, max_steps=STEPS, log_every=50, eval_every=10**9, final_eval=False, seed=1,
                            threads=1, workers=0, out_dir=str(RUN))
t0, c0 = time.time(), time.process_time()
result = train.train(run_cfg)
history = result["history"]
print(f"{STEPS} steps in {time.time() - t0:.0f} s ({time.process_time() - c0:.0f} s of CPU); "
      f"checkpoint {result['last']}")
print("last step, each term / N_tgt:", {k: round(v, 4) for k, v in history[-1].items()})

# %% [markdown]
# ## 5. Decoding the trained model; the KV cache, timed
#
# `evaluate.load` rebuilds the model from its checkpoint (`model.SpeechTranslator.from_checkpoint`) and
# the vocabulary from the path stored in it. `model.generate(enc, enc_lens, lang_id, beam, ...,
# use_cache=...)` decodes a batch. With and without the cache it must give the **same** hypotheses;
# only the time differs. We time both on 4 utterances for several beam sizes (CPU seconds of this
# process, which a busy machine distorts less than the wall clock).

# %%
net_t, vocab_t, ckpt = evaluate.load(result["last"])
de, en = vocab_t.lang_id("de"), vocab_t.lang_id("en")
b4 = data.collate([train_ds[i] for i in range(4)])
with torch.no_grad():
    low, lens4 = net_t.encode_speech(b4.audio, b4.audio_lens)
    enc4 = net_t.encode(low, lens4)                                         # (4, T, D) encoder states
for i in range(2):
    greedy = net_t.greedy(enc4[i:i + 1], lens4[i:i + 1], de)[0]
    beam4 = net_t.generate(enc4[i:i + 1], lens4[i:i + 1], de, beam=4)[0]
    print(f"source   : {train_ds.segments[i].src}\nreference: {train_ds.segments[i].tgt}\n"
          f"greedy   : {vocab_t.decode(greedy)}\nbeam 4   : {vocab_t.decode(beam4)}\n")

BEAMS = (1, 2, 4, 8)
timing = {"cache": [], "no cache": []}
for beam in BEAMS:
    outs = {}
    for name, use_cache in (("cache", True), ("no cache", False)):
        c0 = time.process_time()
        outs[name] = net_t.generate(enc4, lens4, de, beam=beam, use_cache=use_cache)
        timing[name].append(time.process_time() - c0)
    assert outs["cache"] == outs["no cache"], f"beam {beam}: the KV cache changed the hypotheses"
    n_tok = sum(len(h) for h in outs["cache"])
    print(f"beam {beam}: {n_tok} tokens for 4 utterances; {timing['cache'][-1]:.2f} s with the KV cache, "
          f"{timing['no cache'][-1]:.2f} s without ({timing['no cache'][-1] / timing['cache'][-1]:.1f}x), "
          "identical hypotheses")

# %% [markdown]
# ## 6. BLEU, its signature, and BLEU on pieces
#
# ConST reports **case-sensitive, detokenised sacreBLEU** (ConST §4.1): the hypotheses are plain
# text, exactly as a user would read them, and sacreBLEU tokenises them itself with a fixed tokeniser
# (`13a`). Its **signature** records every choice that changes the number: `nrefs` (references per
# segment), `case` (mixed = case-sensitive), `eff` (effective order, for sentence-level BLEU), `tok`
# (the tokeniser), `smooth` (for zero n-gram counts) and the `version`. A BLEU score without its
# signature cannot be compared with another.
#
# Scoring the model's **SentencePiece pieces** instead ("▁Der ▁Mann ▁hat ...") is a different metric:
# the n-grams are pieces, not words, so a half-right word earns partial matches and the count of
# 4-grams depends on the vocabulary. The number usually comes out higher, and it changes when the
# vocabulary changes, so it compares nothing across systems. `evaluate.bleu` always scores detokenised
# text (`vocab.decode` joins the pieces back into words).

# %%
refs = [s.tgt for s in train_ds.segments]
hyps_st = evaluate.decode(net_t, train_ds, vocab_t, "st", beam=4)
bleu_st, signature = evaluate.bleu(hyps_st, refs)
chrf_st, chrf_sig = evaluate.chrf(hyps_st, refs)
print(f"ST BLEU {bleu_st:.2f} on the 64 training segments, beam 4\n  signature: {signature}")
print(f"ST chrF++ {chrf_st:.2f}\n  signature: {chrf_sig}")


def as_pieces(texts: list) -> list:
    return [" ".join(vocab_t.sp.encode(t, out_type=str)) for t in texts]


piece_bleu = sacrebleu.corpus_bleu(as_pieces(hyps_st), [as_pieces(refs)], tokenize="none")   # pieces as they are
print(f"\nthe same hypotheses scored on SentencePiece pieces: BLEU {piece_bleu.score:.2f} (not comparable)")
print("  reference as pieces :", as_pieces(refs[:1])[0])
print("  hypothesis as pieces:", as_pieces(hyps_st[:1])[0])

# %% [markdown]
# **WER** for the ASR task (section 3's metric), and the held-out numbers: on the 64 test sentences that
# the model has never seen, the same model is close to useless after this budget.

# %%
hyps_asr = evaluate.decode(net_t, train_ds, vocab_t, "asr", beam=4)
asr_wer = evaluate.wer(hyps_asr, [s.src for s in train_ds.segments])
print(f"ASR WER {asr_wer:.1f} % on the training segments (beam 4)")
print("  reference :", train_ds.segments[0].src, "->", " ".join(evaluate.normalize_for_wer(train_ds.segments[0].src)))
print("  hypothesis:", hyps_asr[0])
held_out = {task: evaluate.bleu(evaluate.decode(net_t, test_ds, vocab_t, task, beam=1),
                                [s.tgt for s in test_ds.segments])[0] for task in ("st", "mt")}
print(f"unseen tst-COMMON (64 segments, greedy): ST BLEU {held_out['st']:.2f}, MT BLEU {held_out['mt']:.2f}")

# %% [markdown]
# ## 7. BLEU against the beam size; the figure
#
# Beam search pays off where the model is unsure: a greedy choice that looks best locally can lead into
# a poor sentence, and a wider beam keeps the alternatives alive. We decode ST and MT on the training
# segments with beams 1, 2, 4 and 8 (length penalty 1.0).

# %%
bleu_by_beam = {"st": [], "mt": []}
for beam in BEAMS:
    for task, scores in bleu_by_beam.items():
        hyps = hyps_st if (task, beam) == ("st", 4) else evaluate.decode(net_t, train_ds, vocab_t, task, beam=beam)
        scores.append(evaluate.bleu(hyps, refs)[0])
    print(f"beam {beam}: ST BLEU {bleu_by_beam['st'][-1]:5.2f}   MT BLEU {bleu_by_beam['mt'][-1]:5.2f}")

fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
ax = axes[0]
steps = torch.arange(1, len(history) + 1)


def smooth(values: list, k: int = 9) -> torch.Tensor:
    """Centred moving average over k steps (shorter at the ends)."""
    t = torch.tensor(values)[None, None]
    return torch.nn.functional.avg_pool1d(t, k, 1, padding=k // 2, count_include_pad=False)[0, 0]


names = {"st": "ST", "asr": "ASR", "mt": "MT", "ctc": "CTC", "ctr": "CTR (contrastive)"}
total = [sum(weights[k] * h[k] for k in names) for h in history]
for k, label in names.items():
    line, = ax.plot(steps, smooth([h[k] for h in history]), label=f"{label}, weight {weights[k]:g}", lw=1.3)
    ax.plot(steps, [h[k] for h in history], color=line.get_color(), lw=0.5, alpha=0.3)
ax.plot(steps, smooth(total), color="k", lw=2, label="Eq. 1: the weighted sum")
ax.set(yscale="log", xlabel="training step", ylabel="term / N_tgt (log scale; faint: every step)",
       title=f"the terms of Eq. 1 while training\n({len(train_ds)} segments, const recipe, 9-step average)")
ax.legend(fontsize=8, loc="lower left")
ax = axes[1]
for task, color in (("st", "tab:blue"), ("mt", "tab:orange")):
    ax.plot(BEAMS, bleu_by_beam[task], marker="o", color=color, label=f"{task.upper()}, the 64 training segments")
    ax.scatter([1], [held_out[task]], marker="x", s=60, color=color,
               label=f"{task.upper()}, 64 unseen test segments (greedy): {held_out[task]:.1f}")
ax.set_xscale("log", base=2)
ax.set_xticks(BEAMS, [str(b) for b in BEAMS])
ax.set(xlabel="beam size", ylabel="BLEU (sacreBLEU, detokenised)", ylim=(0, 100),
       title="BLEU against the beam size")
ax.legend(fontsize=9)
ax = axes[2]
for name, style in (("cache", "-o"), ("no cache", "--s")):
    ax.plot(BEAMS, timing[name], style, label=f"generate(..., use_cache={name == 'cache'})")
for beam, with_cache, without in zip(BEAMS, timing["cache"], timing["no cache"]):
    ax.annotate(f"{without / with_cache:.0f}x", (beam, without), textcoords="offset points", xytext=(0, 6),
                ha="center", fontsize=9)
ax.set_xscale("log", base=2)
ax.set_xticks(BEAMS, [str(b) for b in BEAMS])
ax.set_ylim(min(timing["cache"]) / 1.5, max(timing["no cache"]) * 2)
ax.set(yscale="log", xlabel="beam size", ylabel="CPU seconds for 4 utterances (log scale)",
       title="beam search with and without the KV cache\n(identical hypotheses; labels: slowdown without)")
ax.legend(fontsize=9, loc="center right")
fig.suptitle("Train, decode, evaluate: the tiny model after "
             f"{STEPS} steps on {len(train_ds)} segments (it has learned them; it does not generalise yet)",
             fontsize=13)
fig.tight_layout()
path = OUT / "train_decode_evaluate.png"
fig.savefig(path, dpi=100)
plt.close(fig)
print("wrote", path)
print(f"tutorial 06 ran in {time.time() - T_START:.0f} s ({time.process_time() - CPU_START:.0f} s of CPU)")

# %% [markdown]
# ## What to see
#
# Numbers from the development machine (one seed; bf16 on a CPU that has it, so another CPU gives
# slightly different ones):
#
# * **Left.** Every term of Eq. 1 falls, at its own pace: CTC and the contrastive term (both on the
#   low-level states) drop by two to three orders of magnitude within about a hundred steps on 64
#   segments, the three cross-entropies more slowly; the black line is what the optimiser sees.
# * **Middle.** On the segments it has learned, ST goes from BLEU 36 (greedy) to 77 (beam 8): greedy
#   search falls into loops ("wenn vi vi vi ...") that a beam escapes, because the sentence that ends
#   soon has a higher total probability than the loop. MT peaks at beam 2–4 and drops at 8: a wider
#   search finds sequences the model scores higher but that are worse, one face of the "beam search
#   curse" (and the reason for length penalties). On unseen sentences both score about 0.3: this
#   budget memorises, it does not translate. Compare beams on *held-out* data in real work.
# * **Right.** The KV cache gives identical hypotheses 5–12x faster here; without it the cost of a
#   sentence grows with the square of its length, and greedy loops make long sentences.
#
# BLEU on pieces (81.0) is above the real BLEU (72.8) for the same hypotheses: with a 300-piece
# vocabulary most words are split into several pieces, and a word with one wrong letter still matches
# most of its piece n-grams. Report detokenised sacreBLEU with its signature.
