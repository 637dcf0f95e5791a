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
# # Tutorial 1: the data and the model
#
# End-to-end speech translation (ST) maps English **speech** $\mathbf{s}$ to a German **translation**
# $\mathbf{y}$ with one network. ConST (Ye, Wang, Li, NAACL 2022, §3) trains that network on triplets
# $(\mathbf{s}, \mathbf{x}, \mathbf{y})$, where $\mathbf{x}$ is the English **transcript**, and on three
# tasks at once:
#
# $$\mathcal{L} = \mathcal{L}_{\text{ST}} + \mathcal{L}_{\text{ASR}} + \mathcal{L}_{\text{MT}}
#   + \lambda \mathcal{L}_{\text{CTR}} \qquad \text{(ConST Eq. 1)}$$
#
# $$\mathcal{L}_{\text{ST}} = -\sum_n \log P(\mathbf{y}_n \mid \mathbf{s}_n), \quad
#   \mathcal{L}_{\text{ASR}} = -\sum_n \log P(\mathbf{x}_n \mid \mathbf{s}_n), \quad
#   \mathcal{L}_{\text{MT}} = -\sum_n \log P(\mathbf{y}_n \mid \mathbf{x}_n).$$
#
# This tutorial follows one utterance through the project's code, from the bytes on disk to the
# decoder's logits:
#
# 1. the MuST-C layout and the built-in demo corpus (`demo_corpus.py`, `data.py`);
# 2. the joint vocabulary and the language tags that tell one decoder which of the three tasks it does;
# 3. the speech front ends: wav2vec2's convolutional feature encoder (receptive field, 20 ms frames)
#    and the log-mel switch for CPUs;
# 4. the length adaptor, the shared encoder and the decoder (`model.py`);
# 5. a figure of the frame grid at every stage.
#
# The contrastive term $\mathcal{L}_{\text{CTR}}$ is tutorial 3's subject. Nothing here is trained: the
# network has random weights, which is enough to see every shape and every frame rate. It runs in well
# under a minute on one CPU core.

# %%
import sys
from pathlib import Path

# the repository root: the folder above tutorials/ (a notebook has no __file__: look upwards from the cwd)
if "__file__" in globals():
    ROOT = Path(__file__).resolve().parent.parent
else:
    ROOT = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "model.py").exists()), Path.cwd())
sys.path.insert(0, str(ROOT))

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import soundfile as sf
import torch
import yaml

import data
import demo_corpus
import model as M

torch.manual_seed(0)
np.random.seed(0)
torch.set_num_threads(1)
OUT = ROOT / "runs" / "tutorials" / "01_data_and_model"
OUT.mkdir(parents=True, exist_ok=True)
print(f"figures and the demo corpus go to {OUT}")

# %% [markdown]
# ## 1. The MuST-C layout
#
# MuST-C (Di Gangi et al., 2019) is the benchmark of all three papers: TED talks in English with their
# transcripts and translations. It does not store one audio file per sentence. Each **talk** is one
# 16 kHz wav file. A YAML file lists the talk's **segments**, one line each, with an offset and a duration
# in seconds. Two text files hold the transcripts and translations, one line per segment, in the same
# order:
#
# ```
# en-de/data/<split>/wav/<talk>.wav           one wav per talk, 16 kHz
# en-de/data/<split>/txt/<split>.yaml         - {duration: 3.5, offset: 16.61, speaker_id: spk.1, wav: ted_1.wav}
# en-de/data/<split>/txt/<split>.en           line i: the transcript of segment i
# en-de/data/<split>/txt/<split>.de           line i: its German translation
# ```
#
# The splits are `train`, `dev` (for model selection) and `tst-COMMON` (for the reported scores).
# The project's **demo corpus** (`demo_corpus.py`) writes exactly this layout. Its English comes from a
# seeded grammar with a correct German translation, and its speech is synthesised by eSpeak NG, one
# voice per talk. So one reader, `data.MustcSplit`, serves the demo and the real corpus. We write a tiny
# demo corpus here: 48 training segments in talks of 8 segments.

# %%
corpus = demo_corpus.write_demo_corpus(OUT / "demo_corpus", demo_corpus.DemoConfig(train=48, dev=8, test=8,
                                                                                  talk_size=8, workers=1),
                                       verbose=False)
for split in data.SPLITS:
    folder = corpus / "data" / split
    wavs = sorted(p.name for p in (folder / "wav").iterdir())
    txts = sorted(p.name for p in (folder / "txt").iterdir())
    print(f"{split:<11} wav/: {len(wavs)} talks ({wavs[0]}, ...)   txt/: {', '.join(txts)}")
yaml_lines = (corpus / "data/train/txt/train.yaml").read_text().splitlines()
en_lines = (corpus / "data/train/txt/train.en").read_text().splitlines()
de_lines = (corpus / "data/train/txt/train.de").read_text().splitlines()
for i in range(3):
    print(f"\nsegment {i}: {yaml_lines[i]}\n  en: {en_lines[i]}\n  de: {de_lines[i]}")

# %% [markdown]
# `data.MustcSplit` reads a split. It parses the YAML, pairs each line with its texts, drops segments
# that ConST's preparation drops (under 1000 samples, empty text, over 30 s in `train`), and reads only
# the samples of a segment when it is asked for it: a real talk lasts 20 minutes, and a batch needs a few
# seconds of it.

# %%
train = data.MustcSplit(corpus, "train")
seg = train.segments[0]
print(seg)

# %% [markdown]
# ### Exercise 1.1: read one segment from its talk
#
# Write `read_segment(wav_path, entry)`. It returns the samples of one YAML `entry` (a dict with
# `offset` and `duration` in seconds) from the talk's wav, as float32 in $[-1, 1]$. The first sample is
# $\mathrm{round}(\text{offset} \cdot 16000)$ and the length is $\mathrm{round}(\text{duration} \cdot 16000)$.
# Read only those samples: `soundfile.read(path, start=..., stop=..., dtype="float32")`.
# The check compares your samples, bit for bit, with `MustcSplit.read_audio`.

# %%
def read_segment(wav_path, entry: dict) -> np.ndarray:
    """The samples of one MuST-C segment: float32 (S,), read from its talk's 16 kHz wav."""
    ### BEGIN SOLUTION
    first = round(float(entry["offset"]) * data.SAMPLE_RATE)
    n = round(float(entry["duration"]) * data.SAMPLE_RATE)
    samples, rate = sf.read(str(wav_path), start=first, stop=first + n, dtype="float32")
    assert rate == data.SAMPLE_RATE
    return samples
    ### END SOLUTION


# %% tags=["check"]
entries = yaml.safe_load((corpus / "data/train/txt/train.yaml").read_text())
assert len(entries) == len(train), "the demo corpus skips no segment"
for i in (0, 1, 9, 47):
    wav = corpus / "data/train/wav" / entries[i]["wav"]
    mine = read_segment(wav, entries[i])
    assert mine.dtype == np.float32 and mine.ndim == 1, "a 1-D float32 array"
    assert np.array_equal(mine, train.read_audio(i)), f"segment {i} differs from MustcSplit.read_audio"
print("Exercise 1.1: correct")

# %% [markdown]
# A first picture of the layout. The top row shows the whole first talk, with its segments shaded. The
# YAML offsets cut the talk into sentences, and the pauses between sentences belong to no segment.
# The bottom row shows the segment that the rest of this tutorial follows.

# %%
talk, _ = sf.read(str(corpus / "data/train/wav" / entries[0]["wav"]), dtype="float32")
fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(11, 4.8))
t = np.arange(len(talk)) / data.SAMPLE_RATE
ax0.plot(t, talk, lw=0.3, color="0.3")
for k, s in enumerate(train.segments[:8]):
    a, b = s.offset / data.SAMPLE_RATE, (s.offset + s.frames) / data.SAMPLE_RATE
    ax0.axvspan(a, b, color=f"C{k % 10}", alpha=0.25)
    ax0.text((a + b) / 2, 0.92, f"seg {k}", ha="center", va="top", fontsize=8, transform=ax0.get_xaxis_transform())
ax0.set(xlim=(0, t[-1]), xlabel="time in the talk (s)", ylabel="amplitude",
        title=f"one talk = one wav ({entries[0]['wav']}); shaded: its 8 segments from train.yaml")
UTT = 2                        # the utterance that the rest of this tutorial follows
audio = torch.from_numpy(train.read_audio(UTT))
ax1.plot(np.arange(len(audio)) / data.SAMPLE_RATE, audio.numpy(), lw=0.4, color=f"C{UTT}")
ax1.set(xlim=(0, len(audio) / data.SAMPLE_RATE), xlabel="time in the segment (s)", ylabel="amplitude",
        title=f"segment {UTT}: “{train.segments[UTT].src}”")
fig.tight_layout()
fig.savefig(OUT / "talk_and_segments.png", dpi=120)
plt.close(fig)
print(f"wrote {OUT / 'talk_and_segments.png'}")

# %% [markdown]
# ## 2. One vocabulary, language tags, three tasks
#
# All text sides share **one** SentencePiece unigram vocabulary. ConST trains 10k pieces on the English
# transcripts and the German translations together; our tiny corpus affords 200. Two pieces are
# reserved as language tags, `<lang:en>` and `<lang:de>`. Special ids follow fairseq: `<s>` 0, `<pad>` 1,
# `</s>` 2, `<unk>` 3. A source sentence is `<lang:en> x </s>`, a target `<lang:de> y </s>`
# (`Vocab.encode_batch`).
#
# One decoder serves all three tasks. The tag at position 0 of each target tells it which one to do:
#
# | task | encoder input | decoder target | tag |
# |---|---|---|---|
# | ST  | speech $\mathbf{s}$ | translation $\mathbf{y}$ | `<lang:de>` |
# | ASR | speech $\mathbf{s}$ | transcript $\mathbf{x}$ | `<lang:en>` |
# | MT  | transcript tokens $\mathbf{x}$ | translation $\mathbf{y}$ | `<lang:de>` |
#
# When the model decodes, the tag is **forced** as the first token and stripped from the output. When it
# trains, the tag's own position gets no loss (fairseq's `ignore_prefix_size=1`). So the tag is a
# *command*, not a prediction.

# %%
vocab = data.build_vocab(corpus, 200, verbose=False)
train = data.MustcSplit(corpus, "train", vocab, verbose=False)
src, tgt = train.src_ids[UTT], train.tgt_ids[UTT]
print("transcript :", train.segments[UTT].src)
print("source ids :", src)
print("pieces     :", [vocab.sp.id_to_piece(i) for i in src])
print("translation:", train.segments[UTT].tgt)
print("target ids :", tgt)
print("pieces     :", [vocab.sp.id_to_piece(i) for i in tgt])
print(f"tags: <lang:en> = {vocab.lang_id('en')}, <lang:de> = {vocab.lang_id('de')}")
print(f"decode(target ids) = {vocab.decode(tgt)!r}  (tags and </s> dropped)")

# %% [markdown]
# ### Exercise 1.2: the decoder's input (teacher forcing)
#
# In training, the decoder reads the target shifted one step to the right and predicts it position by
# position. fairseq, and so ConST, puts `</s>` (id 2) first. For the target
# `<lang:de> y_1 … y_m </s>` the decoder input is `</s> <lang:de> y_1 … y_m`. Write
# `decoder_input(tokens)` for a padded batch `(B, L)`. Every row is shifted right by one, with `</s>`
# first, and padded positions stay `<pad>` (id 1). The check compares the result with `model.shift_right`.

# %%
def decoder_input(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) targets `<lang:xx> y </s> <pad>...` -> (B, L) decoder inputs `</s> <lang:xx> y <pad>...`."""
    ### BEGIN SOLUTION
    prev = torch.full_like(tokens, data.EOS_ID)
    prev[:, 1:] = tokens[:, :-1]
    prev[tokens == data.PAD_ID] = data.PAD_ID
    return prev
    ### END SOLUTION


# %% tags=["check"]
batch = data.collate([train[i] for i in range(4)])
mine = decoder_input(batch.tgt)
assert mine.shape == batch.tgt.shape and mine.dtype == batch.tgt.dtype
assert torch.equal(mine, M.shift_right(batch.tgt)), "differs from model.shift_right"
assert (mine[:, 0] == data.EOS_ID).all() and (mine[:, 1] == vocab.lang_id("de")).all()
print("Exercise 1.2: correct")
print("target       :", batch.tgt[0].tolist())
print("decoder input:", mine[0].tolist())

# %% [markdown]
# ## 3. From waveform to frames: the speech front end
#
# ### wav2vec2's feature encoder
#
# The papers' speech encoder starts with wav2vec2 base (Baevski et al., 2020). Its first part is a
# stack of 7 one-dimensional convolutions over the raw 16 kHz waveform. They have kernels
# $k = (10, 3, 3, 3, 3, 2, 2)$ and strides $s = (5, 2, 2, 2, 2, 2, 2)$, no padding, and a GELU after each
# convolution (the first also has a group norm). Two numbers describe such a stack.
#
# * The **hop** $J$ is how far apart two output frames are in samples: the product of the strides.
# * The **receptive field** $R$ is how many input samples one output frame sees.
#
# Both follow layer by layer from $R_0 = J_0 = 1$:
#
# $$J_l = J_{l-1}\, s_l, \qquad R_l = R_{l-1} + (k_l - 1)\, J_{l-1}.$$
#
# An output frame $t$ sees the samples $[tJ,\; tJ + R)$. It exists only if that window fits in the
# input, so an input of $S$ samples gives
#
# $$T = \left\lfloor \frac{S - R}{J} \right\rfloor + 1 \text{ frames.}$$
#
# ### Exercise 1.3: receptive field and hop
#
# Write `receptive_field(kernels, strides)`. It returns $(R, J)$ in samples. For wav2vec2 base the
# answer is $R = 400$ samples (25 ms) and $J = 320$ samples (20 ms): the **20 ms frames** of all three
# papers. The check also compares the frame count $T$ above with `model.conv_out_lengths`, which applies
# each layer's $\lfloor (L - k)/s \rfloor + 1$ in turn, and with the frames that the tiny model's
# wav2vec2 actually outputs.

# %%
def receptive_field(kernels, strides) -> tuple:
    """Receptive field R and hop J (both in input samples) of a stack of unpadded 1-D convolutions."""
    ### BEGIN SOLUTION
    R, J = 1, 1
    for k, s in zip(kernels, strides):
        R, J = R + (k - 1) * J, J * s
    return R, J
    ### END SOLUTION


# %% tags=["check"]
base = M.Wav2Vec2Config()
R, J = receptive_field(base.conv_kernel, base.conv_stride)
assert (R, J) == (400, 320), f"wav2vec2 base: expected (400, 320) samples, got {(R, J)}"
assert receptive_field([3, 3], [1, 1]) == (5, 1) and receptive_field([2, 2], [2, 2]) == (4, 4)
S = torch.arange(400, 20_000, 37)
assert torch.equal((S - R) // J + 1, M.conv_out_lengths(S, base.conv_kernel, base.conv_stride))
tiny_w2v = M.Wav2Vec2Model(M.PRESETS["tiny"].w2v).eval()
with torch.no_grad():
    for n in (400, 719, 720, 16_000):
        assert tiny_w2v(torch.randn(1, n))[0].shape[1] == (n - R) // J + 1
print(f"Exercise 1.3: correct. wav2vec2 base sees {R} samples = {1000 * R / data.SAMPLE_RATE:.0f} ms per frame, "
      f"one frame every {J} samples = {1000 * J / data.SAMPLE_RATE:.0f} ms")

# %% [markdown]
# ### The log-mel switch
#
# On a CPU, wav2vec2 is slow to train from scratch, so the project's demo recipe uses a **log-mel front
# end** (`frontend="logmel"`, `model.LogMelFrontend`). It computes an 80-bin log-mel spectrogram with
# 25 ms windows every 10 ms, normalises it per utterance, and applies one `Conv1d(k=3, s=2, p=1)` + GELU.
# That conv brings it to wav2vec2's 20 ms frame rate, so everything after the front end is the same.
# The two front ends even give **the same number of frames**. The spectrogram has
# $F = \lfloor (S - 400)/160 \rfloor + 1$ frames, and the stride-2 conv keeps
# $\lfloor (F - 1)/2 \rfloor + 1 = \lfloor (S - 400)/320 \rfloor + 1$ of them.

# %%
cfg_logmel = M.model_config("tiny", vocab_size=len(vocab), frontend="logmel")
logmel = M.LogMelFrontend(cfg_logmel)
S = torch.arange(400, 50_000, 11)
assert torch.equal(logmel.output_lengths(S), M.conv_out_lengths(S, base.conv_kernel, base.conv_stride))
print("log-mel and wav2vec2 give the same frame count for every length from 400 to 50000 samples")

# %% [markdown]
# ## 4. Length adaptor, shared encoder, decoder
#
# wav2vec2's 20 ms frames are still far more numerous than words (a word lasts about 300 ms). ConST
# adds two convolutional layers, the **length adaptor** (fairseq's `Conv1dSubsampler`). Each layer is a
# `Conv1d(kernel 5, stride 2, padding 2)` to $2d$ channels, then a GLU that halves them again. Each layer
# maps $L$ frames to
#
# $$f(L) = \left\lfloor \frac{L - 1}{2} \right\rfloor + 1,$$
#
# so the two layers give 80 ms frames. (The paper's §3.1 says "a stride of 4" per layer; §4.1 and the
# code use 2, so the total is $4\times$.) The result, times $\sqrt{d}$, plus sinusoidal positions, is the
# **low-level speech representation**. The text path builds its low-level representation the same way
# from word embeddings. Both then go through the **same** Transformer encoder (pre-LN), and one decoder
# reads its output. One embedding matrix serves three times: text input, decoder input and output
# projection.
#
# ```
# waveform (B, S) ─ wav2vec2 ─► (B, T, 768) ─ length adaptor ─► (B, T/4, 512) ─ ×√d + pos ─► speech low-level ─┐
# tokens (B, L) ─ embedding E ─ ×√d + pos ───────────────────────────────────────────────────► text low-level ─┤
#                                                  logits (through E^T) ◄─ decoder ◄─ shared encoder (pre-LN) ◄─┘
# ```
#
# ### Exercise 1.4: frames after the length adaptor
#
# Write `adaptor_lengths(lens, layers=2)`. It maps a tensor of frame counts to the counts after the
# length adaptor. The check runs `model.LengthAdaptor` on random inputs of many lengths and compares.

# %%
def adaptor_lengths(lens: torch.Tensor, layers: int = 2) -> torch.Tensor:
    """(B,) frame counts at 20 ms -> (B,) frame counts after `layers` stride-2 convolutions (k 5, p 2)."""
    ### BEGIN SOLUTION
    for _ in range(layers):
        lens = torch.div(lens - 1, 2, rounding_mode="floor") + 1
    return lens
    ### END SOLUTION


# %% tags=["check"]
adaptor = M.LengthAdaptor(in_dim=16, channels=32, out_dim=8, layers=2).eval()
for T in (1, 2, 3, 4, 5, 8, 9, 50, 101):
    with torch.no_grad():
        y, out_lens = adaptor(torch.randn(1, T, 16), torch.tensor([T]))
    mine = adaptor_lengths(torch.tensor([T]))
    assert int(mine) == y.shape[1] == int(out_lens), f"T={T}: yours {int(mine)}, LengthAdaptor {y.shape[1]}"
assert adaptor_lengths(torch.tensor([100]), layers=3).item() == 13
print("Exercise 1.4: correct. 100 frames of 20 ms ->", adaptor_lengths(torch.tensor([100])).item(), "frames of 80 ms")

# %% [markdown]
# ### The whole model on one batch
#
# Now we build the `tiny` preset, the CPU-sized model of the demo recipe, with wav2vec2 as its front end
# (random weights). We record the output of every stage for utterance `UTT` with forward hooks.
# `SpeechTranslator.encode_speech` runs wav2vec2 and the length adaptor, `encode` runs the shared
# encoder, and `forward(batch, tasks)` runs all three tasks with teacher forcing.

# %%
torch.manual_seed(0)
cfg = M.model_config("tiny", vocab_size=len(vocab), frontend="wav2vec2")
net = M.SpeechTranslator(cfg).eval()
parts = {"wav2vec2": net.wav2vec2, "length adaptor": net.subsample, "embeddings (shared)": net.embed_tokens,
         "shared encoder": net.encoder_layers, "decoder": net.decoder_layers}
for name, module in parts.items():
    print(f"{name:<22}{sum(p.numel() for p in module.parameters()) / 1e6:6.2f} M parameters")
print(f"{'total':<22}{sum(p.numel() for p in net.parameters()) / 1e6:6.2f} M")

stages = {}
hooks = [net.wav2vec2.feature_extractor.register_forward_hook(lambda m, i, o: stages.__setitem__("conv", o)),
         net.wav2vec2.register_forward_hook(lambda m, i, o: stages.__setitem__("w2v", o[0])),
         net.subsample.register_forward_hook(lambda m, i, o: stages.__setitem__("adaptor", o[0]))]
with torch.no_grad():
    low, low_lens = net.encode_speech(audio[None], torch.tensor([len(audio)]))
    high = net.encode(low, low_lens)
for h in hooks:
    h.remove()
shapes = [("waveform", tuple(audio[None].shape), "16 kHz samples"),
          ("wav2vec2 conv features", tuple(stages["conv"].shape), "(B, C, T): 20 ms frames"),
          ("wav2vec2 Transformer", tuple(stages["w2v"].shape), "(B, T, 256): 20 ms frames"),
          ("length adaptor", tuple(stages["adaptor"].shape), "(B, T/4, d): 80 ms frames"),
          ("low-level speech (×√d + pos)", tuple(low.shape), "input of the shared encoder"),
          ("shared encoder output", tuple(high.shape), "what the decoder attends to")]
for name, shape, note in shapes:
    print(f"{name:<30}{shape!s:<18}{note}")
assert stages["w2v"].shape[1] == (len(audio) - R) // J + 1
assert low.shape[1] == adaptor_lengths(torch.tensor([stages["w2v"].shape[1]])).item() == high.shape[1]

# %% [markdown]
# The three tasks on a padded batch of four utterances. The logits of each task predict its targets, and
# position 0 of each target is the tag of the table in section 2. Padding never changes a result in this
# code base: utterance `UTT` encoded inside the padded batch equals it encoded alone. Tutorial 2 shows
# why that is not automatic.
#
# The last lines feed the decoder `</s> <lang:xx>`, as generation does, and print its next-piece
# distribution. Untrained, it predicts the tag it has just read, with a probability near 1. The output
# projection is the embedding matrix $E$ (tied), and before training the decoder state is mostly the
# input embedding $\sqrt{d}\,E_{\text{tag}}$ carried through the residual connections. So
# $E\,h \approx \sqrt{d}\,E\,E_{\text{tag}}$ peaks at the tag itself. Training makes the tag choose
# the language of what follows instead.

# %%
batch = data.collate([train[i] for i in range(4)])
with torch.no_grad():
    out = net(batch, tasks=("st", "asr", "mt"))
for task in ("st", "asr", "mt"):
    tag = out.targets[task][:, 0]
    print(f"{task}: logits {tuple(out.logits[task].shape)}, targets {tuple(out.targets[task].shape)}, "
          f"tag {vocab.sp.id_to_piece(int(tag[0]))}")
assert (out.targets["st"][:, 0] == vocab.lang_id("de")).all() and (out.targets["mt"][:, 0] == vocab.lang_id("de")).all()
assert (out.targets["asr"][:, 0] == vocab.lang_id("en")).all()
print("speech states", tuple(out.speech_high.shape), "text states", tuple(out.text_high.shape))
n = int(out.speech_lens[UTT])
assert (out.speech_high[UTT, :n] - high[0]).abs().max() < 1e-4, "a padded batch item equals its run alone"
# the forced tag is the decoder's first input after </s>: it changes what comes next, even untrained
with torch.no_grad():
    for lang in ("de", "en"):
        prefix = torch.tensor([[data.EOS_ID, vocab.lang_id(lang)]])
        probs = net.decode(prefix, high, low_lens)[0, -1].softmax(-1)
        top = probs.topk(3)
        print(f"after </s> <lang:{lang}>, the untrained decoder's top pieces: "
              + ", ".join(f"{vocab.sp.id_to_piece(int(i))!r} {float(p):.3f}" for p, i in zip(*top)))

# %% [markdown]
# ## 5. The frame grid, stage by stage
#
# The last figure puts every stage of the speech path on one time axis.
#
# * The waveform.
# * The log-mel spectrogram (80 bins, a frame every 10 ms). It is taken with a hook on the input of the
#   log-mel front end's stride-2 conv.
# * wav2vec2's conv features and Transformer states (20 ms frames).
# * The length adaptor's output and the shared encoder's output (80 ms frames).
#
# Each heat map draws one column per frame, at the frame's true position in time, so the coarsening
# shows as wider cells. The bottom panel zooms into the first 0.4 s and draws one frame of each stage
# as the span of samples it sees (its receptive field), with tick marks where the following frames start.
# The network is untrained. Its features are random functions of the audio, but they already change at
# the speech pauses. What a trained wav2vec2 puts in these columns is the subject of the papers.

# %%
torch.manual_seed(0)
logmel_in = {}
h = logmel.conv.register_forward_pre_hook(lambda m, i: logmel_in.__setitem__("x", i[0]))
with torch.no_grad():
    logmel(audio[None], torch.tensor([len(audio)]))
h.remove()
sr, dur = data.SAMPLE_RATE, len(audio) / data.SAMPLE_RATE
centre20 = lambda t: (t * J + (R - 1) / 2) / sr                        # wav2vec2 frame t's centre (s)


def edges(centres, hop):
    return np.concatenate([centres - hop / 2, centres[-1:] + hop / 2])


standardise = lambda x: (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)   # per row, over time
rows = [("log-mel spectrogram (the log-mel front end's input to its conv): 80 bins, 10 ms frames",
         logmel_in["x"][0].numpy(), (np.arange(logmel_in["x"].shape[-1]) * 160 + 199.5) / sr, 0.010, "mel bin"),
        ("wav2vec2 conv feature encoder: 64 channels, 20 ms frames", standardise(stages["conv"][0].numpy()),
         centre20(np.arange(stages["conv"].shape[-1])), 0.020, "channel"),
        ("wav2vec2 Transformer output: 256 dims, 20 ms frames", standardise(stages["w2v"][0].T.numpy()),
         centre20(np.arange(stages["w2v"].shape[1])), 0.020, "dim"),
        ("length adaptor output: 256 dims, 80 ms frames", standardise(stages["adaptor"][0].T.numpy()),
         centre20(4 * np.arange(stages["adaptor"].shape[1])), 0.080, "dim"),
        ("shared encoder output: 256 dims, 80 ms frames", standardise(high[0].T.numpy()),
         centre20(4 * np.arange(high.shape[1])), 0.080, "dim")]
fig, axes = plt.subplots(len(rows) + 2, 1, figsize=(11, 15), layout="constrained",
                         gridspec_kw={"height_ratios": [0.9] + [1.2] * len(rows) + [1.1]})
fig.suptitle(f"One utterance through the speech path (tiny model, untrained): segment {UTT}, "
             f"{len(audio)} samples = {dur:.2f} s", fontsize=12)
axes[0].plot(np.arange(len(audio)) / sr, audio.numpy(), lw=0.4, color="0.2")
axes[0].set(xlim=(0, dur), ylabel="amplitude")
axes[0].set_title(f"waveform, 16 kHz: “{train.segments[UTT].src}”", loc="left", fontsize=10)
for ax, (name, img, centres, hop, ylab) in zip(axes[1:], rows):
    x = edges(centres, hop)
    lo, hi = np.percentile(img, [2, 98])
    ax.pcolormesh(x, np.arange(img.shape[0] + 1), img, cmap="magma" if "mel" in name else "coolwarm",
                  vmin=lo, vmax=hi, shading="flat", rasterized=True)
    ax.set(xlim=(0, dur), ylabel=ylab)
    ax.set_title(f"{name} ({img.shape[1]} frames)", loc="left", fontsize=10)
for ax in axes[:-2]:
    ax.tick_params(labelbottom=False)
axes[-2].set_xlabel("time (s); each column is one frame, drawn at its true position "
                    "(feature maps: each row standardised over time)")
# zoom: one frame of each stage as the samples it sees (bar), and every frame's centre (ticks)
zoom = axes[-1]
R_frames, J_frames = receptive_field([5, 5], [2, 2])      # the adaptor on 20 ms frames: 13 frames seen, hop 4
R_adapt = R + (R_frames - 1) * J                           # in samples
spans = [("log-mel\n25 ms every 10 ms", 400, lambda f: (f * 160 + 199.5) / sr, 0.010, 10, "C0"),
         ("wav2vec2, log-mel+conv\n25 ms every 20 ms", R, centre20, 0.020, 5, "C1"),
         (f"length adaptor\n{1000 * R_adapt / sr:.0f} ms every 80 ms", R_adapt, lambda u: centre20(4 * u),
          0.080, 2, "C2")]
for k, (name, width, centre, hop, pick, color) in enumerate(spans):
    y = len(spans) - k
    zoom.broken_barh([(centre(pick) - width / sr / 2, width / sr)], (y - 0.3, 0.6), color=color, alpha=0.45)
    c = centre(np.arange(0, int(0.4 / hop) + 1))
    zoom.vlines(c[c <= 0.4], y - 0.38, y + 0.38, color=color, lw=0.9)
zoom.set(xlim=(0, 0.4), ylim=(0.4, len(spans) + 0.6), xlabel="time (s), the first 0.4 s",
         yticks=range(len(spans), 0, -1), yticklabels=[name for name, *_ in spans])
zoom.set_title("the frame grid: the samples one frame of each stage sees (bar), the centres of all its frames (ticks)",
               loc="left", fontsize=10)
fig.savefig(OUT / "frame_grid.png", dpi=110)
plt.close(fig)
print(f"wrote {OUT / 'frame_grid.png'}")
