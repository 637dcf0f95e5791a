"""train.py: the config, then one flat training loop.

    python train.py                                   # the main job: demo corpus, tiny model, CPU, <= 20 min
    python train.py --preset=base --data=/path/to/en-de --w2v_path=/path/to/wav2vec_small.pt   # the paper
    python train.py --stage=mt --max_steps=2000       # MT pre-training only (text), then --init_from=...
    torchrun --nproc_per_node=2 train.py ...          # DDP

Every field of TrainConfig can be set as --key=value; the resolved config is printed and saved in
each checkpoint. The objective is ConST Eq. 1 as one visible weighted sum (see `objective`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import model as M
import losses as L
from sinkhorn import SSPC


@dataclass
class TrainConfig:
    preset: str = "tiny"            # tiny (CPU demo) | base (the papers' model and recipe)
    recipe: str = "xstnet"          # a name for the alignment terms that are on (RECIPES sets their weights); this
                                    # dataclass's defaults are xstnet, the command line's default is const (CLI_RECIPE)
    data: str = "demo_data/en-de"   # an en-XX folder in MuST-C layout; the demo corpus is built there if absent
    out_dir: str = "runs/demo"
    stage: str = "all"              # all (the main job: MT stage, multitask stage from it, evaluation) | mt (text-only
                                    # pre-training) | multitask (ST + ASR + MT on speech batches), one stage alone
    init_from: str = ""             # a checkpoint whose model weights start this run (e.g. the MT stage)
    resume: bool = False            # continue exactly from out_dir/last.pt
    seed: int = 1
    device: str = "auto"            # auto | cpu | cuda
    bf16: str = "auto"              # auto (a GPU: bf16 where native, else fp16; a CPU: what a short probe measures
                                    # faster, cached) | true | false
    threads: int = 0                # torch CPU threads; 0 = the cores this process may run on (taskset, cgroups)
    # model
    frontend: str = "logmel"        # wav2vec2 | logmel
    w2v_path: str = ""              # pretrained wav2vec2 (HF folder or fairseq .pt)
    vocab_size: int = 1000
    dropout: float = 0.1            # on residual branches, embeddings and attention weights
    activation_dropout: float = 0.0  # inside the FFN; 0 on the CPU demo (its masks are a large share of a small step)
    # data and batches
    max_audio_seconds: float = 30.0
    batch_seconds: float = 60.0     # padded audio per batch
    batch_tokens: int = 800         # padded tokens per text-only batch (MT stage: the MT stage's learning transition
                                    # comes with the number of updates at a moderate lr, so small batches)
    max_sentences: int = 100
    workers: int = 1
    # objective (ConST Eq. 1; the alignment terms of losses.py / sinkhorn.py join this sum)
    st_weight: float = 1.0
    asr_weight: float = 1.0
    mt_weight: float = 1.0
    ctc_weight: float = 1.0
    ctr_weight: float = 0.0         # lambda of ConST's contrastive term (Eq. 1); the `const` recipe sets 1.5
    ctr_tau: float = 0.02           # its temperature
    ctr_views: str = "original"     # '+'-joined positives (ConST §3.3, Fig. 4): original, rep, sma, scut, fcut
    ctr_level: str = "low"          # low (the shared encoder's input, ConST) | high (its output, Table 4)
    ctr_symmetric: bool = False     # add the text->speech direction (--use-dual-ctr)
    cutoff_rate: float = 0.1        # SCut / FCut rate (ConST App. B)
    sma_p: float = 0.25             # span-masked audio: fraction masked, span length in samples (ConST App. B)
    sma_span: int = 3600
    l2_weight: float = 0.0          # ConST Table 5's L2 alternative on the same pooled vectors
    halign_weight: float = 0.0      # H-Align (docs/methods.md, "S-Align: H-Align"); the recipes set 1.5 x 0.3 = 0.45 as the code does
    halign_tau: float = 0.1
    adv_weight: float = 0.0         # S-Align's at-scale a (4.0): weight of the adversarial terms
    adv_variant: str = "confusion"  # confusion (the official code: L_D + L_G towards 0.5) | grl (gradient reversal)
    adv_d_extra: float = 1.5        # L_D's extra factor in the official code
    adv_decay_start: float = 0.5    # a is constant until this fraction of max_steps (25k of 50k) ...
    adv_decay_end: float = 0.9      # ... then falls linearly to 0 here (45k of 50k)
    adv_gen_warmup: float = 0.02    # no L_G before this fraction of max_steps (1k of 50k)
    adv_mixup: str = "auto"         # speech/text mix-up for D: ctc (CTC-aligned) | length (proportional) | none | auto
    adv_mixup_prob: float = 0.3     # per batch
    adv_mixup_start: float = 0.06   # fraction of max_steps (3k of 50k)
    adv_text_noise: bool = True     # blank-noise the transcript fed to D (target 1 - rho)
    adv_noise_p: float = 0.2
    adv_noise_rho: float = 0.3
    sspc_weight: float = 0.0        # beta of SSPC (sinkhorn.py), per sentence (docs/methods.md, "SSPC")
    sspc_anchors: int = 64
    sspc_r: int = 0                 # anchors per sample; 0 = anchors // 2
    sspc_queue: int = 4096
    sspc_cost: str = "code"         # code (the official BCE on exp(P / 0.1)) | bce | ce
    label_smoothing: float = 0.1
    reencode_asr: bool = False      # ConST encodes the speech again for ASR; False reuses the ST pass (CPU)
    # optimisation
    lr: float = 1e-3
    w2v_lr_scale: float = 1.0       # wav2vec2's lr = lr * this
    warmup: int = 200
    clip: float = 1.0
    accum: int = 1
    max_steps: int = 1000
    max_minutes: float = 0.0        # opt-in: also stop a stage at this wall time (the results table says so); 0 = never
    save_minutes: float = 2.0       # write last.pt this often (wall time; it changes no number); 0 = every step
    # the main job's MT stage (stage=all): text-only pre-training, then the multitask stage starts from it
    mt_steps: int = 600
    mt_lr: float = 1e-3             # 2e-3 and 4e-3 learned slower per sentence (README, "the main job")
    mt_warmup: int = 100
    freeze_w2v_steps: int = 0
    max_bad_steps: int = 20         # this many non-finite losses in a row stop the run
    # logging and evaluation
    log_every: int = 25
    eval_every: int = 500
    eval_beam: int = 1
    eval_dev_max: int = 200         # dev segments decoded at each evaluation
    final_eval: bool = True         # evaluate tst-COMMON at the end and print the results table
    keep_last: int = 0              # also keep the weights of the last N evaluations (step_<N>.pt) to average, as ConST
                                    # averages its last 10 (python evaluate.py --ckpt runs/x/step_*.pt)


TRAIN_PRESETS = {
    "tiny": {},
    # ConST App. B (docs/methods.md, "ConST: hyper-parameters"): Adam(0.9, 0.98), lr 1e-4, inverse-sqrt warmup 25k, clip 10, 1M samples per GPU, update-freq 2
    "base": dict(frontend="wav2vec2", vocab_size=10_000, dropout=0.1, activation_dropout=0.1, batch_seconds=62.5, max_sentences=10_000,
                 lr=1e-4, warmup=25_000, clip=10.0, accum=2, max_steps=500_000, ctc_weight=0.0, reencode_asr=True,
                 eval_every=1000, eval_beam=4, eval_dev_max=10**9, max_audio_seconds=30.0, workers=4),
}
# Named recipes switch the alignment terms on with the papers' values; the multitask backbone
# (XSTNet: ST + ASR + MT + CTC) is the same for all, so their effects compare.
#   st-only      ST alone: no ASR, MT or CTC (ConST Table 3's last row, "-ASR -MT -CTR")
#   xstnet       no alignment term (ConST with lambda 0)
#   const        contrastive, low level, lambda 1.5, tau 0.02 for En-De (ConST §4.1), with the sequence
#                cut-off positives: Original+SCut, ConST's best En-De view set (Fig. 4)
#   h-align      contrastive on the shared encoder's outputs, tau 0.1, weight 1.5 x CTC's 0.3 (S-Align code)
#   s-align      adversarial soft alignment, a = 4 (S-Align code)
#   s+h          both (S-Align's "both" row); the S-Align code's weights are against its 0.7-weighted ST
#                cross-entropy, so objective divides them by 0.7 (losses.adversarial_weights)
#   sspc         SSPC, beta 1 (docs/methods.md, "SSPC");  sspc+const: with ConST's contrastive term
RECIPES = {
    "st-only": {"asr_weight": 0.0, "mt_weight": 0.0, "ctc_weight": 0.0},
    "xstnet": {},
    "const": {"ctr_weight": 1.5, "ctr_tau": 0.02, "ctr_views": "original+scut"},
    "h-align": {"halign_weight": 0.45, "halign_tau": 0.1},
    "s-align": {"adv_weight": 4.0},
    "s+h": {"adv_weight": 4.0, "halign_weight": 0.45, "halign_tau": 0.1},
    "sspc": {"sspc_weight": 1.0},
    "sspc+const": {"sspc_weight": 1.0, "ctr_weight": 1.5, "ctr_tau": 0.02},
}
CTR_WEIGHT = {"de": 1.5, "nl": 1.5}      # ConST's lambda by target language (1.0 for the others); RECIPES holds En-De's
CLI_RECIPE = "const"     # `python train.py` shows one of the papers' methods at work: ConST
CTR_VIEWS = ("original", "rep", "sma", "scut", "fcut")


def _unknown_key(key: str, fields) -> str:
    close = difflib.get_close_matches(key, fields, n=3)
    return f"unknown config key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(fields)}")


def config(preset: str = TrainConfig.preset, recipe: str = CLI_RECIPE, **overrides) -> TrainConfig:
    """What the command line builds, from Python: the preset's training settings, then the recipe's
    weights, then `overrides` (TrainConfig's fields). `TrainConfig(...)` itself takes its fields as given:
    `TrainConfig(recipe="s-align")` names a recipe without switching its term on (check_config says so)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in overrides:
        if key not in fields:
            raise SystemExit(_unknown_key(key, fields))
    terms = dict(RECIPES.get(recipe, {}))   # an unknown preset or recipe: check_config names the known ones
    if "ctr_weight" in terms:             # ConST §4.1: lambda 1.5 for German and Dutch, 1.0 for the other targets
        terms["ctr_weight"] = CTR_WEIGHT.get(data.target_language(overrides.get("data", TrainConfig.data)), 1.0)
    cfg = TrainConfig(**{**TRAIN_PRESETS.get(preset, {}), **terms, "preset": preset, "recipe": recipe, **overrides})
    check_config(cfg)
    return cfg


def usage() -> str:
    """`python train.py --help`: every TrainConfig field, grouped as the dataclass groups them, with its
    default and the comment beside it (the dataclass is the one place that documents the settings)."""
    import inspect
    import re
    out = [__doc__.strip(), "", "settings (--key=value; the command line's recipe is " + CLI_RECIPE + "):", "", "system"]
    for line in inspect.getsource(TrainConfig).splitlines()[1:]:
        field_ = re.match(r"    (\w+): \w+ = (.+?)(?:\s+# (.*))?$", line)
        if field_:
            out.append((f"  --{field_[1]}={field_[2].strip(chr(34))}".ljust(34) + f" {field_[3] or ''}").rstrip())
        elif re.match(r"    # ", line):                                   # a group of settings
            out += ["", line.strip()[2:].split(" (")[0]]
        elif re.match(r"\s{20,}# ", line):                                # a comment's second line
            out[-1] += " " + line.strip()[2:]
    return "\n".join(out)


def parse_config(argv: list) -> TrainConfig:
    """--key=value overrides, type-checked against TrainConfig; unknown keys list close matches."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    given = {}
    if "--help" in argv or "-h" in argv:
        print(usage())
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"expected --key=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if key not in fields:
            raise SystemExit(_unknown_key(key, fields))
        typ = type(fields[key].default)
        if not eq and typ is bool:
            value = "true"
        try:
            if typ is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                given[key] = value.lower() in ("true", "1")
            else:
                given[key] = typ(value)
        except ValueError:
            raise SystemExit(f"--{key} expects a {typ.__name__}, got {value!r}") from None
    return config(**given)


def model_config(cfg: TrainConfig, vocab_size: int) -> M.ModelConfig:
    mcfg = M.model_config(cfg.preset, vocab_size=vocab_size, frontend=cfg.frontend,
                          w2v_path="" if cfg.w2v_path == "none" else cfg.w2v_path,
                          dropout=cfg.dropout, attention_dropout=cfg.dropout,
                          activation_dropout=cfg.activation_dropout)
    mcfg.w2v.hidden_dropout = mcfg.w2v.attention_dropout = mcfg.w2v.feat_proj_dropout = cfg.dropout
    return mcfg


def inverse_sqrt(step: int, warmup: int) -> float:
    """Linear warm-up to 1, then 1/sqrt decay: the lr multiplier at `step` (fairseq's inverse_sqrt)."""
    step = max(step, 1)
    return min(step / warmup, math.sqrt(warmup / step))


class TextOnly(torch.utils.data.Dataset):
    """A split without its audio: the MT pre-training stage reads no wav."""

    def __init__(self, ds: data.MustcSplit):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return {"id": self.ds.segments[i].id, "audio": np.zeros(0, np.float32), "src": self.ds.src_ids[i],
                "tgt": self.ds.tgt_ids[i]}


CHOICES = {"stage": ("all", "multitask", "mt"), "bf16": ("auto", "true", "false"), "ctr_level": ("low", "high"), "adv_variant": ("confusion", "grl"),
           "adv_mixup": ("auto", "ctc", "length", "none"), "sspc_cost": ("code", "bce", "ce")}


def check_config(cfg: TrainConfig):
    for name, table, kind in ((cfg.preset, TRAIN_PRESETS, "preset"), (cfg.recipe, RECIPES, "recipe")):
        if name not in table:
            raise SystemExit(f"unknown {kind} {name!r}; choose one of {sorted(table)}")
        # a name whose settings were never applied (TrainConfig(recipe="const") from Python) would train
        # something else than the logs say: all of them still at TrainConfig's defaults is that mistake
        settings, default = table[name], TrainConfig()
        if settings and all(getattr(cfg, k) == getattr(default, k) for k in settings):
            wanted = ", ".join(f"{k}={v}" for k, v in settings.items())
            raise SystemExit(f"{kind}={name!r}, but none of its settings is applied ({wanted}): build the config "
                             f"with train.config({kind}={name!r}, ...) (as the command line does), or pass them")
    if cfg.preset == "base" and cfg.frontend == "wav2vec2" and not cfg.w2v_path:
        raise SystemExit("--preset=base fine-tunes a pretrained wav2vec2: pass --w2v_path=/path/to/wav2vec_small.pt (or a "
                         "Hugging Face folder), or --w2v_path=none to start from random weights on purpose")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key}={getattr(cfg, key)!r}: choose one of {', '.join(allowed)}")
    if cfg.adv_d_extra <= 0:
        raise SystemExit(f"--adv_d_extra={cfg.adv_d_extra}: L_D's extra factor must be > 0 (the official code's is 1.5)")
    if not 0 <= cfg.sspc_r <= cfg.sspc_anchors:
        raise SystemExit(f"--sspc_r={cfg.sspc_r}: anchors per sample must be between 1 and --sspc_anchors="
                         f"{cfg.sspc_anchors} (0: half of them)")
    views = cfg.ctr_views.split("+")
    if not views or any(v not in CTR_VIEWS for v in views) or len(set(views)) != len(views):
        raise SystemExit(f"--ctr_views={cfg.ctr_views!r}: join distinct names from {', '.join(CTR_VIEWS)} with '+'")


def build_aligners(cfg: TrainConfig, d_model: int) -> torch.nn.ModuleDict:
    """The alignment terms' own weights, outside the translation model: S-Align's discriminator and
    SSPC's anchors and queues. Empty for xstnet and const."""
    aux = torch.nn.ModuleDict()
    if cfg.adv_weight > 0:
        aux["disc"] = L.ModalityDiscriminator(d_model, dropout=cfg.dropout)
    if cfg.sspc_weight > 0:
        aux["sspc"] = SSPC(d_model, k=cfg.sspc_anchors, r=cfg.sspc_r or None, queue=cfg.sspc_queue, cost=cfg.sspc_cost)
    return aux


def text_tables(vocab: data.Vocab) -> dict:
    """(V,) lookups for S-Align's text noise: punctuation pieces, and pieces that start a word."""
    pieces = [vocab.sp.id_to_piece(i) for i in range(len(vocab))]
    special = {data.BOS_ID, data.PAD_ID, data.EOS_ID, data.UNK_ID, *vocab.tags.values()}
    punct = [i not in special and p.lstrip("\u2581") in {",", ".", ";", "!", "?", ":", "..", "..."} for i, p in enumerate(pieces)]
    initial = [i not in special and p.startswith("\u2581") and not punct[i] for i, p in enumerate(pieces)]
    return {"punctuation": torch.tensor(punct), "word_initial": torch.tensor(initial)}


def contrastive_views(cfg: TrainConfig, raw: M.SpeechTranslator, batch: data.Batch, out: M.Outputs) -> dict:
    """ConST's positive pairs (u, v), one N-pair term each (§3.3; docs/methods.md): the original pair
    and any of the hard examples: span-masked audio (SMA), repeated words (Rep), sequence and feature
    cut-off (SCut, FCut) of the low-level speech states. The transcript side is a fresh embedding
    pass, as ConST's code. With ctr_level=high both sides go through the shared encoder (Table 4)."""
    level_high = cfg.ctr_level == "high"

    def speech(states, lens):
        return M.masked_mean(raw.encode(states, lens) if level_high else states, lens)

    def text(tokens, lens):
        states, lens = raw.encode_text(tokens, lens)
        return M.masked_mean(raw.encode(states, lens) if level_high else states, lens)

    u = M.masked_mean(out.speech_high, out.speech_lens) if level_high else M.masked_mean(out.speech_low, out.speech_lens)
    v = text(batch.src, batch.src_lens)
    pairs = {}
    for view in cfg.ctr_views.split("+"):
        if view == "original":
            pairs[view] = (u, v)
        elif view == "rep":
            special = {data.BOS_ID, data.PAD_ID, data.EOS_ID, *batch.src[:, 0].tolist()}   # tags stay single
            pairs[view] = (u, text(*data.repeat_words_batch(batch.src, batch.src_lens, special)))
        elif view == "sma":
            masked, _ = data.span_mask_audio(batch.audio, batch.audio_lens, cfg.sma_p, cfg.sma_span)
            pairs[view] = (speech(*raw.encode_speech(masked, batch.audio_lens)), v)
        elif view == "scut":
            pairs[view] = (speech(L.sequence_cutoff(out.speech_low, out.speech_lens, cfg.cutoff_rate), out.speech_lens), v)
        elif view == "fcut":
            pairs[view] = (speech(L.feature_cutoff(out.speech_low, out.speech_lens, cfg.cutoff_rate), out.speech_lens), v)
    return pairs


def s_align_terms(cfg: TrainConfig, raw: M.SpeechTranslator, disc: L.ModalityDiscriminator, batch: data.Batch,
                  out: M.Outputs, step: int, tables: dict) -> tuple:
    """S-Align's adversarial terms (docs/methods.md, "S-Align"): the discriminator sees the speech pass's
    encoder output (target 0), or, in a mixed batch, a speech/text mix-up at ratio r (target r); and
    the transcript pass's output (target 1), or a blank-noised transcript (target 1 - rho). Each
    sentence weighs its transcript length (the official code weighs positions; our speech is not
    CTC-shrunk, so its frame count would dwarf the text's). L_D and L_G are means over these 2B rows,
    as the official code reduces them; `objective` weighs them (losses.adversarial_weights has the
    derivation of the scale). -> (L_D, L_G, logs)."""
    B = len(batch)
    z_sp, y_sp = out.speech_high, torch.zeros(B, device=out.speech_high.device)
    mixup = cfg.adv_mixup if cfg.adv_mixup != "auto" else ("ctc" if cfg.ctc_weight > 0 else "length")
    mixed = 0.0
    if mixup != "none" and step >= cfg.adv_mixup_start * cfg.max_steps and float(torch.rand((), device="cpu")) < cfg.adv_mixup_prob:
        T = out.speech_low.shape[1]
        if mixup == "ctc":    # each frame's CTC label (blank included), as the official code after shrinking
            with torch.no_grad():
                tokens = F.linear(raw.ctc_states(out.speech_subsampled), raw.embed_tokens.weight).argmax(-1)
        else:
            tokens = batch.src.gather(1, L.length_proportional_alignment(out.speech_lens, batch.src_lens, T))
        # a text frame: the scaled word embedding at the speech frame's position, no dropout
        frames = raw.embed_tokens(tokens) * raw.embed_scale + raw.positions[:T].to(out.speech_low.dtype)
        y_sp = torch.rand(B, device=z_sp.device)
        mix, _ = L.modality_mixup(out.speech_low, out.speech_lens, frames, y_sp)
        z_sp, mixed = raw.encode(mix, out.speech_lens), 1.0
    if cfg.adv_text_noise:
        tx, tx_lens, y_tx, _ = L.blank_noise(batch.src, batch.src_lens, tables["punctuation"].to(batch.src.device),
                                             tables["word_initial"].to(batch.src.device), cfg.adv_noise_p,
                                             cfg.adv_noise_rho)
        z_tx = raw.encode(*raw.encode_text(tx, tx_lens))
    else:
        tx_lens, y_tx = batch.src_lens, torch.ones(B, device=z_sp.device)
        z_tx = out.text_high
    # the 2B rows that D scores, as the official code concatenates them: B speech (or mixed), B text
    z, lens = L.stack_rows((z_sp, out.speech_lens), (z_tx, tx_lens))
    y = torch.cat([y_sp, y_tx.to(z_sp.device)])
    w = batch.src_lens.float().repeat(2)
    if cfg.adv_variant == "grl":
        logits = disc(L.grad_reverse(z, L.grl_lambda(step / max(cfg.max_steps, 1))), lens)
        loss_d = L.modality_bce(logits, y, w)
        loss_g = torch.zeros((), device=z.device)
    else:
        loss_d = L.discriminator_loss(disc, z, lens, y, w)
        loss_g = L.generator_loss(disc, z, lens, w)
        with torch.no_grad():
            logits = disc(z, lens)
    with torch.no_grad():   # accuracy of D on a 0.5 threshold of its targets
        acc = ((logits.squeeze(-1) > 0) == (y > 0.5)).float().mean()
    per_position = len(w) / w.sum()            # the losses are means of w_i BCE_i; log the BCE per position
    logs = {"disc_bce": loss_d.detach() * per_position, "gen_bce": loss_g.detach() * per_position,
            "disc_acc": acc, "mixed": mixed}      # tensors: read on the host only when logged
    return loss_d, loss_g, logs


def objective(cfg: TrainConfig, model: M.SpeechTranslator, batch: data.Batch, tasks: tuple, step: int = 0,
              aux: torch.nn.ModuleDict | None = None, tables: dict | None = None) -> tuple:
    """ConST Eq. 1 with every alignment term of the three papers, as one weighted sum of summed
    losses divided by the ST target tokens (docs/methods.md, "Objective"). Returns (loss, dict of logged values:
    each term per target token, plus the alignment terms' own diagnostics; tensors or numbers, read on the
    host only when logged)."""
    raw = model.module if hasattr(model, "module") else model
    out = model(batch, tasks, reencode_asr=cfg.reencode_asr)
    n_tokens, B = batch.tgt_lens.sum(), len(batch)
    terms, logs = {}, {}
    for task in tasks:
        terms[task], _, _ = L.label_smoothed_cross_entropy(out.logits[task], out.targets[task], cfg.label_smoothing)
    speech = "st" in tasks
    if speech and cfg.ctc_weight > 0:      # ConST's ctc_cnn head: the length adaptor's output, no positions
        terms["ctc"] = L.ctc_loss(raw.ctc_states(out.speech_subsampled), out.speech_lens, raw.embed_tokens.weight,
                                  batch.src, batch.src_lens)
    if speech and (cfg.halign_weight > 0 or cfg.adv_weight > 0 or cfg.sspc_weight > 0) and out.text_high is None:
        out.text_low, out.text_lens = raw.encode_text(batch.src, batch.src_lens)
        out.text_high = raw.encode(out.text_low, out.text_lens)
    if speech and cfg.ctr_weight > 0:      # ConST: one N-pair term per positive view
        terms["ctr"] = sum(L.contrastive_loss(u, v, cfg.ctr_tau, cfg.ctr_symmetric)
                           for u, v in contrastive_views(cfg, raw, batch, out).values())
    if speech and cfg.l2_weight > 0:
        v = M.masked_mean(raw.encode_text(batch.src, batch.src_lens)[0], batch.src_lens)
        terms["l2"] = L.l2_alignment_loss(M.masked_mean(out.speech_low, out.speech_lens), v)
    if speech and cfg.halign_weight > 0:   # the code's alpha * (N_src / B) * L_CL, in its 0.3-weighted CTC branch
        terms["halign"] = L.hard_alignment_loss(out.speech_high, out.speech_lens, out.text_high, out.text_lens,
                                                cfg.halign_tau) * batch.src_lens.sum() / B
    adv_d = adv_g = 0.0
    if speech and cfg.adv_weight > 0:
        terms["adv_d"], terms["adv_g"], more = s_align_terms(cfg, raw, aux["disc"], batch, out, step, tables)
        d_w, g_w = L.adversarial_weights(step, cfg.max_steps, cfg.adv_weight, cfg.adv_d_extra,
                                         cfg.adv_decay_start, cfg.adv_decay_end, cfg.adv_gen_warmup)
        a = d_w / cfg.adv_d_extra
        if cfg.adv_variant == "grl":       # one reversed loss, weight a
            d_w = a
        # from the official code's units (a against its 0.7 CE) to ours (a unit-weight CE): the
        # per-token ratio a / (1.4 B) of L_G to the ST cross-entropy (losses.adversarial_weights)
        adv_d, adv_g = d_w / L.SALIGN_ST_CE_WEIGHT, g_w / L.SALIGN_ST_CE_WEIGHT
        logs.update(more, adv_a=a)
    if speech and cfg.sspc_weight > 0:     # input space: pooled low-level speech, sqrt(d) E[x] without positions
        e_in = {"s": M.masked_mean(out.speech_low, out.speech_lens),
                "x": M.masked_mean(raw.embed_tokens(batch.src) * raw.embed_scale, batch.src_lens)}
        e_j = {"s": M.masked_mean(out.speech_high, out.speech_lens), "x": M.masked_mean(out.text_high, out.text_lens)}
        sspc, more = aux["sspc"](e_in, e_j)
        terms["sspc"] = sspc * B           # a per-sentence mean, summed over sentences like the rest
        logs.update(more)
    weights = {"st": cfg.st_weight, "asr": cfg.asr_weight, "mt": cfg.mt_weight, "ctc": cfg.ctc_weight,
               "ctr": cfg.ctr_weight, "l2": cfg.l2_weight, "halign": cfg.halign_weight / L.SALIGN_ST_CE_WEIGHT,
               "adv_d": adv_d, "adv_g": adv_g,
               "sspc": cfg.sspc_weight}
    loss = (
        weights["st"] * terms.get("st", 0.0)
        + weights["asr"] * terms.get("asr", 0.0)
        + weights["mt"] * terms.get("mt", 0.0)
        + weights["ctc"] * terms.get("ctc", 0.0)
        + weights["ctr"] * terms.get("ctr", 0.0)          # ConST: lambda * L_CTR (summed over its views)
        + weights["l2"] * terms.get("l2", 0.0)            # ConST Table 5: L2 instead
        + weights["halign"] * terms.get("halign", 0.0)    # S-Align's H-Align: 0.45 / 0.7 * (N_src / B) * L_CL
        + weights["adv_d"] * terms.get("adv_d", 0.0)      # S-Align: 1.5 a / 0.7 * L_D (trains the discriminator only)
        + weights["adv_g"] * terms.get("adv_g", 0.0)      # S-Align: a / 0.7 * L_G (trains the encoders only)
        + weights["sspc"] * terms.get("sspc", 0.0)        # SSPC: beta * L_SSPC
    ) / n_tokens
    return loss, {**{k: v.detach() / n_tokens for k, v in terms.items()}, **logs}   # tensors: no wait for the device


def logged_floats(rows: list, device: torch.device) -> list:
    """Steps' logged values (tensors on the device, or numbers) as dicts of floats, read from the device in
    one transfer: logging waits for the device once per log_every steps, not once per term and step."""
    flat = [torch.as_tensor(v, device=device).float().reshape(()) for r in rows for v in r.values()]
    values = iter(torch.stack(flat).tolist() if flat else [])
    return [{k: next(values) for k in r} for r in rows]


# what a resumed run must share with the run it continues (the model's and the aligners' shapes)
RUN_DEFINING = ("preset", "recipe", "frontend", "vocab_size", "adv_weight", "sspc_weight", "sspc_anchors", "sspc_queue")
WEIGHTS_ONLY = ("model", "config", "model_config", "vocab", "step")    # what evaluate.py and averaging read


def save_checkpoint(path: Path, state: dict):
    """Atomic: write a temporary file, then rename; a killed run never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def probe_bf16(threads: int, cache: Path | None = Path.home() / ".cache" / "st-align" / "precision.json") -> tuple:
    """Is bf16 autocast faster than fp32 on this CPU? -> (bool, how it was decided). Machines here
    differ: on one, bf16 made a step 1.7x faster; on another (AVX-512 without AMX), 1.2x slower. So
    measure instead of asking a capability flag: forward and backward of one of our tiny encoder layers
    at a training step's shapes, best of 5, once per CPU model, torch version, thread count and probe
    version (cached). A CPU without native bf16 may run it 30x slower, or refuse it (an error): fp32 then."""
    import platform
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    key = f"{cpu} | torch {torch.__version__} | {threads} threads | probe 3"
    table = json.loads(cache.read_text()) if cache and cache.exists() else {}
    if key in table:
        return table[key]["bf16"], f"cached probe: bf16 {table[key]['bf16_ms']} ms, fp32 {table[key]['fp32_ms']} ms"
    rng_state = torch.get_rng_state()       # the probe must not move the run's random numbers
    layer = M.EncoderLayer(M.model_config("tiny", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))
    x, pad_mask = torch.randn(24, 40, 256), torch.zeros(24, 40, dtype=torch.bool)
    ms = {}
    for name, on in (("fp32", False), ("bf16", True), ("fp32", False), ("bf16", True)):
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
                    layer(x, pad_mask).float().pow(2).mean().backward()
            except RuntimeError:            # a kernel that refuses bf16 on this CPU: fp32 it is
                break
            best = min(best, time.perf_counter() - t0)
        ms[name] = round(1000 * best, 2) if best < float("inf") else float("inf")   # the warm round overwrites
    torch.set_rng_state(rng_state)
    choice = ms["bf16"] < 0.9 * ms["fp32"]   # bf16 costs accuracy: take it only for a clear gain
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        table[key] = {"bf16": choice, "bf16_ms": ms["bf16"], "fp32_ms": ms["fp32"]}
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, cache)
    return choice, f"probe: bf16 {ms['bf16']} ms, fp32 {ms['fp32']} ms"


def setup_distributed(device_name: str) -> tuple:
    """-> (ddp, rank, world, device). Under torchrun (RANK and WORLD_SIZE set) the process group is made once
    per process: the main job's two stages share it (train.py's __main__ takes it down at the end)."""
    device = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available() else
                          ("cpu" if device_name == "auto" else device_name))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False, 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        # rank 0 evaluates dev alone while the others wait at their next all-reduce: allow it an hour
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=1))
    return True, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


def precision(cfg: TrainConfig, device: torch.device) -> tuple:
    """-> (autocast dtype, or None for fp32; why). A GPU: bf16 where it runs bf16 natively (Ampere and later),
    else fp16 with a GradScaler (V100 and T4 only emulate bf16). A CPU: whichever the probe measures faster."""
    if cfg.bf16 == "false":
        return None, "set by --bf16"
    if device.type == "cuda" and cfg.bf16 == "auto":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "CUDA with native bf16"
        return torch.float16, "CUDA without native bf16: fp16 with loss scaling"
    if cfg.bf16 == "true":
        return torch.bfloat16, "set by --bf16"
    faster, why = probe_bf16(torch.get_num_threads())
    return (torch.bfloat16 if faster else None), why


class Interrupted(data.UserError):
    """SIGINT or SIGTERM stopped a stage; last.pt was saved first."""


def train(cfg: TrainConfig, bar=None) -> dict:
    """One stage (cfg.stage mt or multitask) -> {"step", "history", "skipped", "minutes", "best",
    "last", "notes"}. `bar`: a tqdm bar to advance (the main job shows one over both stages)."""
    check_config(cfg)
    if cfg.stage == "all":        # one stage is trained here; main_job() strings the stages together
        cfg = dataclasses.replace(cfg, stage="multitask")
    # -- distributed, device, precision, seeds
    ddp, rank, world, device = setup_distributed(cfg.device)
    if device.type == "cpu":     # the cores this process may use (taskset), not the machine's count
        torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    main_proc = rank == 0
    say = print if main_proc else (lambda *a, **k: None)
    amp_dtype, why = precision(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)   # fp16 only: loss scaling
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)

    # -- data
    root = Path(cfg.data)
    if not (root / "data" / "train").exists():
        if cfg.data != TrainConfig.data:
            raise data.Missing(f"{root}/data/train does not exist; point --data at an en-XX folder in MuST-C layout")
        if main_proc:
            say(f"building the demo corpus in {root.parent} (once)")
            import demo_corpus   # a dataset generator: needed once, on the first run
            demo_corpus.write_demo_corpus(root.parent)
        if ddp:
            torch.distributed.barrier()
    vocab = data.build_vocab(root, cfg.vocab_size, verbose=main_proc)
    train_ds = data.MustcSplit(root, "train", vocab, max_frames=int(cfg.max_audio_seconds * data.SAMPLE_RATE),
                               verbose=main_proc)
    dev_ds = data.MustcSplit(root, "dev", vocab, verbose=main_proc)
    text_stage = cfg.stage == "mt"
    tasks = ("mt",) if text_stage else tuple(t for t in ("st", "asr", "mt") if getattr(cfg, f"{t}_weight") > 0)
    if text_stage:
        lengths = [max(len(s), len(t)) for s, t in zip(train_ds.src_ids, train_ds.tgt_ids)]
        sampler = data.BucketBatchSampler(lengths, cfg.batch_tokens, cfg.max_sentences, cfg.seed, rank=rank,
                                          world_size=world)
        dataset = TextOnly(train_ds)
    else:
        sampler = data.BucketBatchSampler([s.frames for s in train_ds.segments],
                                          int(cfg.batch_seconds * data.SAMPLE_RATE), cfg.max_sentences, cfg.seed,
                                          rank=rank, world_size=world)
        dataset = train_ds
    # the loader's own generator: creating an iterator must not draw from the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data.collate,
                                         num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed),
                                         pin_memory=device.type == "cuda")     # pinned: copied while the GPU works

    # -- model and optimiser
    model = M.SpeechTranslator(model_config(cfg, len(vocab))).to(device)
    mcfg = model.cfg                   # with the loaded wav2vec2's own config when --w2v_path gives one
    if cfg.init_from:
        init = M.load_checkpoint(cfg.init_from)
        state = init["model"]
        if cfg.w2v_path not in ("", "none") and init["config"].get("w2v_path", "") in ("", "none"):
            # the start's wav2vec2 was random (an MT stage run without --w2v_path): keep the pretrained one
            state = {k: v for k, v in state.items() if not k.startswith("wav2vec2.")}
            say(f"wav2vec2 from {cfg.w2v_path}, not from {cfg.init_from} (whose wav2vec2 was random)")
        ours = model.state_dict()
        wrong = [k for k, v in state.items() if k in ours and v.shape != ours[k].shape]
        if wrong:
            raise data.BadInput(f"{cfg.init_from}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, this model's "
                                f"{tuple(ours[wrong[0]].shape)}: a checkpoint of another model or vocabulary (its "
                                f"vocabulary: {init['vocab']}); start from one trained with this --data and --preset")
        missing, unexpected = model.load_state_dict(state, strict=False)
        front_end = ("wav2vec2.", "logmel.")      # the MT stage leaves either front end untrained: either may be swapped
        if any(not k.startswith(front_end) for k in unexpected) or any(
                not k.startswith((*front_end, "subsample.")) for k in missing):
            raise data.BadInput(f"{cfg.init_from}: weights do not fit this model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
        say(f"initialised from {cfg.init_from} (step {init['step']}); new: {sorted({k.split('.')[0] for k in missing})}")
    aux = build_aligners(cfg, mcfg.d_model).to(device)
    tables = text_tables(vocab)
    w2v_params = [p for n, p in model.named_parameters() if n.startswith("wav2vec2.")]
    other = [p for n, p in model.named_parameters() if not n.startswith("wav2vec2.")]
    # the aligners' weights (discriminator, anchors) learn with the same Adam and lr (S-Align, SSPC). fused: one
    # kernel per parameter instead of ~10 passes over memory (3x faster on a CPU core: 0.15 -> 0.05 s for 100M
    # parameters); Hugging Face's Trainer uses it too by default (adamw_torch_fused).
    optimizer = torch.optim.Adam([{"params": other, "lr": cfg.lr},
                                  {"params": w2v_params, "lr": cfg.lr * cfg.w2v_lr_scale},
                                  {"params": list(aux.parameters()), "lr": cfg.lr}], betas=(0.9, 0.98),
                                 fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: inverse_sqrt(s, cfg.warmup))
    step, best_bleu, bad_in_row, skipped = 0, -1.0, 0, 0
    if cfg.resume:
        if not (out_dir / "last.pt").exists():
            raise data.Missing(f"nothing to resume in {out_dir}: it has no last.pt; start without --resume")
        ck = M.load_checkpoint(out_dir / "last.pt")
        changed = [k for k in RUN_DEFINING if ck["config"].get(k) != getattr(cfg, k)]
        if changed:
            raise data.BadInput(f"{out_dir / 'last.pt'} was trained with " + ", ".join(
                f"--{k}={ck['config'].get(k)}" for k in changed) + f", not {', '.join(f'--{k}={getattr(cfg, k)}' for k in changed)}"
                f": resume with its settings, or start a new --out_dir")
        model.load_state_dict(ck["model"])
        aux.load_state_dict(ck.get("aligners", {}))
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck.get("scaler", {}))
        sampler.load_state_dict(ck["sampler"])
        step, best_bleu, skipped = ck["step"], ck["best_bleu"], ck["skipped"]
        random.setstate(ck["rng"]["python"])
        torch.set_rng_state(ck["rng"]["torch"])
        if torch.cuda.is_available() and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
        say(f"resumed from {out_dir / 'last.pt'} at step {step}")
    # Parameters without a gradient in some step: the MT stage leaves the speech path unused, and wav2vec2 always
    # has some (masked_spec_embed, which fine-tuning never uses; LayerDrop's skipped layers; the frozen phase)
    unused = text_stage or mcfg.frontend == "wav2vec2"
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused) if ddp else model
    if ddp:     # DDP broadcasts the model's weights from rank 0; the aligners sit outside it
        for t in (*aux.parameters(), *aux.buffers()):
            torch.distributed.broadcast(t.data, 0)
    say("config: " + json.dumps(asdict(cfg)))
    say(f"model: {cfg.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"frontend {mcfg.frontend}, tasks {'+'.join(tasks)}, device {device}, threads {torch.get_num_threads()}, "
        f"precision {str(amp_dtype or torch.float32).replace('torch.', '')} ({why}), world {world}")
    if len(aux):
        say(f"recipe {cfg.recipe}: aligners {', '.join(aux)} ({sum(p.numel() for p in aux.parameters()) / 1e6:.2f}M "
            f"parameters)")

    def checkpoint_state() -> dict:
        return {"model": model.state_dict(), "aligners": aux.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "sampler": sampler.state_dict(), "step": step, "best_bleu": best_bleu, "skipped": skipped,
                "config": asdict(cfg), "model_config": asdict(mcfg), "vocab": str(vocab.path.resolve()),
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}

    # -- the loop
    from tqdm import tqdm
    log_file = open(out_dir / "log.jsonl", "a" if cfg.resume else "w") if main_proc else None
    t_start, t_log, utts, toks = time.time(), time.time(), 0, 0
    batches = iter(loader)
    history, pending, notes, t_saved = [], [], [], time.time()     # pending: steps not yet read from the device
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=cfg.max_steps, initial=step, disable=not main_proc, desc=cfg.stage, dynamic_ncols=True)
    # Ctrl-C / SIGTERM: finish the step, save last.pt, stop (a second Ctrl-C stops at once)
    stop, handlers = [], {}
    if main_proc and not ddp and threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            if stop:
                raise KeyboardInterrupt
            stop.append(signal.Signals(signum).name)
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    while step < cfg.max_steps:
        if stop:
            save_checkpoint(out_dir / "last.pt", checkpoint_state())
            for s, h in handlers.items():
                signal.signal(s, h)
            bar.close()
            raise Interrupted(f"{stop[0]} at step {step} of the {cfg.stage} stage: saved {out_dir / 'last.pt'}; "
                              f"continue with the same command and --resume")
        if cfg.max_minutes and time.time() - t_start > 60 * cfg.max_minutes:
            notes.append(f"--max_minutes={cfg.max_minutes:g} stopped the {cfg.stage} stage at step {step} of "
                         f"{cfg.max_steps}: a model trained less than asked")
            say(notes[-1])
            break
        if cfg.freeze_w2v_steps and mcfg.frontend == "wav2vec2":
            model.freeze_wav2vec2(step < cfg.freeze_w2v_steps)
        net.train()
        aux.train()
        optimizer.zero_grad(set_to_none=True)
        step_terms, bad = {}, torch.zeros((), device=device)
        for micro in range(cfg.accum):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            toks += int(batch.tgt_lens.sum())          # target tokens, counted on the host: no device sync
            batch = batch.to(device)
            # under DDP the gradients are all-reduced in the last micro-batch's backward only
            with net.no_sync() if ddp and micro < cfg.accum - 1 else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    loss, terms = objective(cfg, net, batch, tasks, step, aux, tables)
                bad = bad + ~torch.isfinite(loss.detach())
                scaler.scale(loss / cfg.accum).backward()
            sampler.advance()
            utts += len(batch)
            for k, v in terms.items():
                step_terms[k] = step_terms.get(k, 0.0) + v / cfg.accum
        if ddp:     # a non-finite loss on any rank skips the update on every rank: the ranks stay in step
            torch.distributed.all_reduce(bad)
        if ddp and len(aux):     # the aligners sit outside DDP: average their gradients by hand
            for p in aux.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        # clipped on their own: the discriminator's loss trains only the discriminator and must not
        # shrink the translation model's step through a shared norm
        if len(aux):
            torch.nn.utils.clip_grad_norm_(aux.parameters(), cfg.clip)
        if not bool((bad == 0) & torch.isfinite(grad_norm)):      # the step's one wait for the device
            skipped, bad_in_row = skipped + 1, bad_in_row + 1
            say(f"step {step}: non-finite loss or gradient, update skipped ({skipped} so far)")
            if bad_in_row >= cfg.max_bad_steps:
                raise RuntimeError(f"{bad_in_row} non-finite losses in a row at step {step}: lower --lr, check the data "
                                   f"(python data.py stats) or switch --bf16=false")
            optimizer.zero_grad(set_to_none=True)
            scaler.update()                        # fp16: an overflow lowers the loss scale
            continue
        bad_in_row = 0
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        bar.update(1)
        if main_proc and time.time() - t_saved >= 60 * cfg.save_minutes and step < cfg.max_steps:
            save_checkpoint(out_dir / "last.pt", checkpoint_state())     # a kill loses minutes, not the run
            t_saved = time.time()
        pending.append(step_terms)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            rows, pending = logged_floats(pending, device), []
            history += rows
            seconds = time.time() - t_log
            record = {"step": step, **{k: round(sum(r.get(k, 0.0) for r in rows) / len(rows), 4) for k in dict.fromkeys(k for r in rows for k in r)},
                      "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 3),
                      "utt_per_s": round(utts * world / seconds, 1), "tok_per_s": round(toks * world / seconds),
                      "minutes": round((time.time() - t_start) / 60, 2),
                      **({"peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)} if device.type == "cuda"
                         else {})}
            bar.write(" ".join(f"{k} {v}" for k, v in record.items())) if main_proc else None
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            t_log, utts, toks = time.time(), 0, 0
        if main_proc and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            import evaluate
            task = "mt" if text_stage else "st"
            dev = evaluate.bleu_on(model, dev_ds, vocab, task, beam=cfg.eval_beam, limit=cfg.eval_dev_max,
                                   device=device, bf16=amp_dtype == torch.bfloat16)
            bar.write(f"step {step}: dev {task.upper()} BLEU {dev:.2f}")
            if log_file:
                log_file.write(json.dumps({"step": step, f"dev_{task}_bleu": dev}) + "\n")
            state = checkpoint_state()
            if dev > best_bleu:
                best_bleu = state["best_bleu"] = dev
                save_checkpoint(out_dir / "best.pt", state)
            save_checkpoint(out_dir / "last.pt", state)
            if cfg.keep_last:             # the weights alone: what averaging needs
                save_checkpoint(out_dir / f"step_{step}.pt", {k: state[k] for k in WEIGHTS_ONLY})
                for old in sorted(out_dir.glob("step_*.pt"), key=lambda p: int(p.stem[5:]))[:-cfg.keep_last]:
                    old.unlink()
    if own_bar:
        bar.close()
    if main_proc:
        save_checkpoint(out_dir / "last.pt", checkpoint_state())
        if not (out_dir / "best.pt").exists():
            save_checkpoint(out_dir / "best.pt", checkpoint_state())
    for s, h in handlers.items():
        signal.signal(s, h)
    if stop:     # the signal came during the stage's last step: the stage is whole, the job still stops
        raise Interrupted(f"{stop[0]} at step {step} of the {cfg.stage} stage (its last): saved {out_dir / 'last.pt'}; "
                          f"continue with the same command and --resume")
    history += logged_floats(pending, device)
    if ddp:         # no rank reads this stage's checkpoints (the next stage's init_from) before rank 0 wrote them
        torch.distributed.barrier()
    return {"step": step, "history": history, "skipped": skipped, "minutes": (time.time() - t_start) / 60,
            "best": str(out_dir / "best.pt"), "last": str(out_dir / "last.pt"), "notes": notes}


def main(argv: list):
    """`python train.py [--key=value ...]`: the main job with these overrides (stage=all): the MT
    stage, the multitask stage from it, the tst-COMMON evaluation and the results table. With
    --stage=mt or --stage=multitask, that one stage alone (multitask ends with the evaluation too)."""
    cfg = parse_config(argv)
    if cfg.stage == "all":
        return main_job(cfg)
    result = train(cfg)
    if cfg.final_eval and int(os.environ.get("RANK", 0)) == 0 and cfg.stage == "multitask":
        import evaluate
        summary = evaluate.main(["--ckpt", result["last"], "--split", "tst-COMMON", "--beam", "5", "--quiet"])
        print(evaluate.results_table(summary, result["minutes"], result["notes"]))
    return result


def main_job(cfg: TrainConfig) -> dict:
    """MT pre-training (out_dir/mt; skipped when --init_from names a start), the multitask stage
    from it (out_dir), evaluation. Fixed work: steps, never the wall clock, decide where it stops
    (unless --max_minutes is set). --resume continues in whichever stage it stopped."""
    import evaluate
    from tqdm import tqdm
    t0, out = time.time(), Path(cfg.out_dir)
    mt_dir, init = out / "mt", cfg.init_from
    run_mt = not init and cfg.mt_steps > 0
    if not cfg.resume and ((out / "last.pt").exists() or (run_mt and (mt_dir / "last.pt").exists())):
        raise data.UserError(f"{out} already holds a run; continue it with --resume, or choose another --out_dir")
    if cfg.resume and not (out / "last.pt").exists() and not (run_mt and (mt_dir / "last.pt").exists()):
        raise data.Missing(f"nothing to resume in {out}: it has no last.pt{' nor mt/last.pt' if run_mt else ''}; "
                           f"start without --resume")
    total = (cfg.mt_steps if run_mt else 0) + cfg.max_steps
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"the main job: {f'{cfg.mt_steps} MT steps, then ' if run_mt else ''}{cfg.max_steps} multitask steps "
              f"({cfg.recipe}), then tst-COMMON with beam 5; the bar's ETA covers all {total} steps")
    bar = tqdm(total=total, desc="main job", dynamic_ncols=True, disable=int(os.environ.get("RANK", 0)) != 0)
    notes = []
    if run_mt:
        mt_cfg = dataclasses.replace(cfg, stage="mt", out_dir=str(mt_dir), max_steps=cfg.mt_steps, lr=cfg.mt_lr,
                                     warmup=cfg.mt_warmup, eval_every=cfg.mt_steps, final_eval=False,
                                     resume=cfg.resume and (mt_dir / "last.pt").exists())
        mt_step = M.load_checkpoint(mt_dir / "last.pt")["step"] if mt_cfg.resume else 0   # read once
        bar.update(min(mt_step, cfg.mt_steps))
        if mt_step < cfg.mt_steps:
            notes += train(mt_cfg, bar)["notes"]
        init = str(mt_dir / "last.pt")
    st_cfg = dataclasses.replace(cfg, stage="multitask", init_from=init, eval_every=0,
                                 resume=cfg.resume and (out / "last.pt").exists())
    if st_cfg.resume:
        bar.update(M.load_checkpoint(out / "last.pt")["step"])
    result = train(st_cfg, bar)
    bar.close()
    notes += result["notes"]
    if not cfg.final_eval:
        return result
    if int(os.environ.get("RANK", 0)) != 0:     # under torchrun, rank 0 alone evaluates
        return result
    summary = evaluate.main(["--ckpt", result["last"], "--split", "tst-COMMON", "--beam", "5", "--quiet"])
    print(evaluate.results_table(summary, (time.time() - t0) / 60, notes))
    return summary


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Interrupted as err:
        sys.exit(str(err))
    except KeyboardInterrupt:             # a second Ctrl-C, or one outside a training loop
        sys.exit("interrupted: each stage's last.pt holds its last save; continue with the same command and --resume")
    except data.UserError as err:         # a mistake in the input: one line; a bug keeps its traceback
        sys.exit(f"error: {err}")
