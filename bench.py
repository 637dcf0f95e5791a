"""bench.py: speed and memory, measured as ratios against a peer in the same run.

    python bench.py                 # every benchmark
    python bench.py --only data     # one of them
    python bench.py --device=cuda   # the rows that run on a GPU (wav2vec2, decode, train_step, hf_step, generate, mfu)

data: segments/s of the MuST-C reader + collate + bucketed sampler, in the main process and with
one loader worker, against the peer a simpler reader would be: read the whole talk, then slice (CPU).
wav2vec2: forward+backward of our wav2vec2 against Hugging Face's Wav2Vec2Model with identical
weights on the same audio (base shapes, fp32).
decode: beam search with the KV cache against the same search recomputing every prefix (generate's
use_cache=True against use_cache=False, the same tokens).
sinkhorn: sinkhorn_knopp and multi_assignment_sinkhorn (and its direct K x N x K form) against
POT's ot.sinkhorn on the same N x K cosine scores, the same number of iterations (CPU).
train_step: one optimiser step of the main job's tiny model (const, a typical 26-utterance batch)
against the same step without each of its two levers: no FFN activation dropout, and one stacked
decoder pass for ST+ASR+MT (SpeechTranslator.decode_stacked) instead of one pass per task.
precision: that step, and a base wav2vec2 ST step, in fp32 and in bf16 autocast, and what train.py's
bf16=auto probe picks here (CPU).
hf_step: one optimiser step of our model with the papers' front end (wav2vec2), and of ours with HF's
architecture (no shared encoder), against Hugging Face's SpeechEncoderDecoderModel of the same size
(Wav2Vec2Model + MBartForCausalLM), tiny and base shapes, fp32 and bf16, the same audio and targets.
generate: beam 5 from audio on those three models, all forced to the same number of tokens, and ours'
speech encoder alone: the floor under our search's time (the same wav2vec2 arithmetic as HF's encoder).
mfu: FLOPs of the tiny and base training steps (torch.utils.flop_counter) per second, divided by
the FLOP/s of a square matrix product (a @ b; 2048 on a CPU, 8192 on a GPU) measured in the same run
and precision.

bf16 rows run on a CPU always and on a GPU only where it runs bf16 natively
(torch.cuda.is_bf16_supported(including_emulation=False)); elsewhere only the fp32 rows.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import data
import demo_corpus


@dataclass
class BenchConfig:
    only: str = ""                  # run one: data | wav2vec2 | decode | sinkhorn | train_step | precision
                                    # | hf_step | generate | mfu
    device: str = "cpu"             # cuda: the rows in GPU_ROWS on a GPU (larger batches there); the
                                    # others (data, sinkhorn, precision) measure CPU code and are skipped
    data: str = ""                  # an en-XX folder; default: a fresh demo corpus
    segments: int = 2000            # size of that fresh demo corpus (train split)
    max_seconds: float = 60.0       # padded audio per batch, as the CPU demo trains


def bench_data(cfg: BenchConfig) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(cfg.data) if cfg.data else demo_corpus.write_demo_corpus(
            tmp, demo_corpus.DemoConfig(train=cfg.segments, dev=10, test=10), verbose=False)
        vocab = data.build_vocab(root, 1000, verbose=False)
        ds = data.MustcSplit(root, "train", vocab, verbose=False)
        frames = [s.frames for s in ds.segments]
        rows = []
        for workers in (0, 1):
            sampler = data.BucketBatchSampler(frames, int(cfg.max_seconds * data.SAMPLE_RATE), seed=0)
            t0, n = time.perf_counter(), 0
            for batch in data.make_loader(ds, sampler, num_workers=workers):
                n += len(batch)
            rows.append((f"reader + collate, {workers} worker(s)", n / (time.perf_counter() - t0)))
        # the peer: read each talk whole and slice it, as a reader without seeking would
        t0 = time.perf_counter()
        for s in ds.segments:
            x, _ = sf.read(str(s.wav), dtype="float32")
            _ = x[s.offset:s.offset + s.frames]
        peer = len(ds) / (time.perf_counter() - t0)
        rows.append(("peer: read the whole talk, slice", peer))
        # memory while reading one segment: must not depend on the talk's length
        tracemalloc.start()
        ds.read_audio(0)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    print(f"\n## data ({len(ds)} segments, {ds.hours:.2f} h, batches of <= {cfg.max_seconds:.0f} s padded audio)")
    print(f"| {'what':<40} | {'segments/s':>10} | {'vs peer':>8} |\n|{'-' * 42}|{'-' * 12}|{'-' * 10}|")
    for name, rate in rows:
        print(f"| {name:<40} | {rate:>10.0f} | {rate / peer:>7.1f}x |")
    print(f"peak Python memory reading one {ds.segments[0].frames / 16000:.1f} s segment: {peak / 2**20:.2f} MiB")
    return rows


DEVICE = torch.device("cpu")                    # main() sets it from --device


def _sync():
    """Wait for the GPU's queued work, so that a clock read after it counts it (no-op on a CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _where() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"


def _precisions() -> tuple:
    """bf16 for each row group to run: fp32, and bf16 autocast on a CPU or on a GPU that runs bf16 natively
    (V100s and T4s only emulate it; train.py gives them fp16 with a GradScaler, not timed here)."""
    native = DEVICE.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    return (False, True) if native else (False,)


def _train_bf16() -> bool:
    """train.py's bf16=auto for DEVICE: a GPU's native bf16 (_precisions), a CPU's probe (bf16 if measured faster)."""
    if DEVICE.type == "cuda":
        return True in _precisions()
    import train
    return train.probe_bf16(torch.get_num_threads())[0]


def _time(fn, reps: int) -> float:
    fn()                                        # warm-up
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / reps


def _time_interleaved(fns: list, reps: int) -> list:
    """Median seconds per call of each fn, calling them in turn (A B C A B C ...) so that a machine
    whose speed drifts (another job, a neighbour on the host) slows every peer alike."""
    for fn in fns:
        fn()                                    # warm-up
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times]


def _table(title: str, rows: list, unit: str):
    print(f"\n## {title}")
    w = max(40, *(len(name) for name, _, _ in rows))
    print(f"| {'what':<{w}} | {unit:>10} | {'ratio':>8} |\n|{'-' * (w + 2)}|{'-' * 12}|{'-' * 10}|")
    for name, value, ratio in rows:
        print(f"| {name:<{w}} | {value:>10.3f} | {ratio:>7.2f}x |")


def bench_wav2vec2(cfg: BenchConfig, seconds: float = 4.0, batch: int = 2, reps: int = 3) -> list:
    import transformers
    import model
    torch.manual_seed(0)
    ref = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(layerdrop=0.0)).train()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = model.load_wav2vec2(tmp).train().to(DEVICE)
    ref.to(DEVICE)
    ours.cfg.layerdrop = 0.0
    audio = torch.randn(batch, int(seconds * data.SAMPLE_RATE), device=DEVICE)

    def step(m, run):
        m.zero_grad(set_to_none=True)
        run(m).pow(2).mean().backward()
    t_ours, t_hf = _time_interleaved([lambda: step(ours, lambda m: m(audio)[0]),
                                      lambda: step(ref, lambda m: m(audio).last_hidden_state)], reps)
    rows = [("ours: forward + backward", t_ours, t_hf / t_ours), ("HF Wav2Vec2Model: forward + backward", t_hf, 1.0)]
    _table(f"wav2vec2 base, {batch} x {seconds:g} s audio, fp32, {_where()} (higher ratio = faster)",
           rows, "s/step")
    return rows


def bench_decode(cfg: BenchConfig, batch: int = 16, beam: int = 5, length: int = 30, reps: int = 2) -> list:
    """generate(use_cache=True) against generate(use_cache=False) from the same encoder states (the text
    encoder's, tiny preset, fp32); both must write the same tokens."""
    import model
    torch.manual_seed(0)
    m = model.SpeechTranslator(model.model_config("tiny")).eval().to(DEVICE)
    tokens = torch.randint(6, 1000, (batch, 20), device=DEVICE)
    lens = torch.full((batch,), 20, device=DEVICE)
    with torch.no_grad():
        enc = m.encode(*m.encode_text(tokens, lens))

    def run(cache):
        return m.generate(enc, lens, 5, beam=beam, max_len_a=0, max_len_b=length, use_cache=cache)
    assert run(True) == run(False)
    t_cache, t_full = _time(lambda: run(True), reps), _time(lambda: run(False), reps)
    rows = [("beam search with KV cache", t_cache, t_full / t_cache), ("beam search, full recomputation", t_full, 1.0)]
    _table(f"decode, tiny preset, {batch} sentences, beam {beam}, up to {length} tokens, fp32, {_where()} "
           f"(ratio = full recomputation's time / this time)", rows, "s/batch")
    return rows


def bench_sinkhorn(cfg: BenchConfig, n: int = 4096, k: int = 256, iters: int = 20, reps: int = 10) -> list:
    import ot
    import sinkhorn
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(n, 128, generator=g), dim=-1) @ \
        torch.nn.functional.normalize(torch.randn(k, 128, generator=g), dim=-1).T
    a, b, m = np.full(n, 1 / n), np.full(k, 1 / k), (-scores).double().numpy()

    def pot(method):
        return ot.sinkhorn(a, b, m, 0.05, method=method, numItermax=iters, stopThr=0.0)
    t_pot = _time(lambda: pot("sinkhorn"), reps)
    t_pot_log = _time(lambda: pot("sinkhorn_log"), reps)
    t_sk = _time(lambda: sinkhorn.sinkhorn_knopp(scores, 0.05, iters), reps)
    t_sk_log = _time(lambda: sinkhorn.sinkhorn_knopp(scores, 0.05, iters, log_domain=True), reps)
    t_msk = _time(lambda: sinkhorn.multi_assignment_sinkhorn(scores, k // 2, 0.07, iters), reps)
    t_direct = _time(lambda: sinkhorn.multi_assignment_sinkhorn_direct(scores, k // 2, 0.07, iters), 1)
    rows = [("sinkhorn_knopp (fp32, scaling vectors)", t_sk, t_pot / t_sk),
            ("sinkhorn_knopp, log_domain=True", t_sk_log, t_pot / t_sk_log),
            ("POT ot.sinkhorn (plain, fp64)", t_pot, 1.0),
            ("POT ot.sinkhorn, method=sinkhorn_log", t_pot_log, t_pot / t_pot_log),
            ("multi_assignment_sinkhorn (2 x N x K)", t_msk, t_pot / t_msk),
            ("multi_assignment_sinkhorn_direct (K x N x K)", t_direct, t_pot / t_direct)]
    _table(f"Sinkhorn, N = {n}, K = {k}, {iters} iterations (ratio = POT plain time / this time)", rows, "s/call")
    return rows


def _tiny_step(activation_dropout=0.0, stacked=True, bf16=True, seed=0):
    """A closure running one optimiser step of the main job's model and objective (const) on a fixed
    synthetic batch shaped like the demo corpus's (26 utterances of 1.6-3 s, 8-20 pieces).
    stacked=False: the peer that runs one decoder pass per task instead of decode_stacked's one."""
    import train
    import model as M
    torch.manual_seed(seed)
    cfg = train.TrainConfig(recipe="const", ctr_weight=1.5, ctr_tau=0.02, activation_dropout=activation_dropout)
    m = M.SpeechTranslator(train.model_config(cfg, 1000)).train().to(DEVICE)
    if not stacked:     # the peer: one decoder pass per task
        m.decode_stacked = lambda jobs: {t: m.decode(*j) for t, j in jobs.items()}
    opt = torch.optim.Adam(m.parameters(), 1e-4, fused=True)        # as train.py's
    batch = _audio_batch(26, 1.6, 3.0, seed)

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = train.objective(cfg, m, batch, ("st", "asr", "mt"), 0, torch.nn.ModuleDict(), {})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_train_step(cfg: BenchConfig, reps: int = 10) -> list:
    bf16 = _train_bf16()
    variants = {"main job's step (both levers)": {},
                "with FFN activation dropout 0.1": dict(activation_dropout=0.1),
                "with one decoder pass per task": dict(stacked=False),
                "both (no lever)": dict(activation_dropout=0.1, stacked=False)}
    times = _time_interleaved([_tiny_step(bf16=bf16, **over) for over in variants.values()], reps)
    rows = [(name, t, t / times[0]) for name, t in zip(variants, times)]
    _table(f"tiny training step (const, 26 utterances), bf16 {bf16}, {_where()} "
           f"(ratio = this row's time / the first row's)", rows, "s/step")
    return rows


def bench_precision(cfg: BenchConfig, reps: int = 8) -> list:
    import train
    t32, t16 = _time_interleaved([_tiny_step(bf16=False), _tiny_step(bf16=True)], reps)
    ours, hf = _hf_pair("base")
    batch = _audio_batch(*HF_BATCH["base"])
    b32, b16 = _time_interleaved([_hf_steps(ours, hf, batch, bf16)[0] for bf16 in (False, True)], max(1, reps // 3))
    choice, why = train.probe_bf16(torch.get_num_threads(), cache=None)
    rows = [("tiny (main job's step), fp32", t32, 1.0), ("tiny (main job's step), bf16 autocast", t16, t32 / t16),
            (f"base (wav2vec2, ST, {HF_BATCH['base'][0]} utterances), fp32", b32, 1.0),
            (f"base (wav2vec2, ST, {HF_BATCH['base'][0]} utterances), bf16 autocast", b16, b32 / b16)]
    _table(f"precision of the tiny and base training steps, {torch.get_num_threads()} threads (ratio = fp32 time / "
           f"this row's); bf16=auto picks bf16={choice} ({why})", rows, "s/step")
    return rows


# ----------------------------------------------------------------------------------------------
# Against Hugging Face: what a user would otherwise pick (issue 11)
# ----------------------------------------------------------------------------------------------
def _audio_batch(n: int, lo: float, hi: float, seed: int = 0) -> "data.Batch":
    """n utterances of lo-hi seconds of noise with random transcripts and translations (8-20 pieces)."""
    rng = np.random.default_rng(seed)
    items = [{"id": str(i), "audio": rng.standard_normal(int(rng.uniform(lo, hi) * data.SAMPLE_RATE)).astype(np.float32) * 0.1,
              "src": [5, *rng.integers(6, 1000, int(rng.integers(8, 20))).tolist(), data.EOS_ID],
              "tgt": [6, *rng.integers(6, 1000, int(rng.integers(8, 20))).tolist(), data.EOS_ID]} for i in range(n)]
    return data.collate(items).to(DEVICE)


def _hf_pair(preset: str, seed: int = 0, shared_encoder: bool = True) -> tuple:
    """Our SpeechTranslator with the papers' front end (wav2vec2) and Hugging Face's
    SpeechEncoderDecoderModel of the same size: its Wav2Vec2Model (same shape, with its conv adapter in
    place of our length adaptor: 2 layers, kernel 5, stride 2, to d_model) and MBartForCausalLM as the
    decoder (pre-LN like ours; same width, depth, heads, FFN, vocabulary; cross-attention; tied output).
    Ours also has the shared Transformer encoder between the two (more work per step, not less);
    shared_encoder=False leaves it out (encoder_layers=0): then both have the same architecture. HF's
    model gets no audio attention mask, as Hugging Face advises for group-norm wav2vec2 (base): its adapter
    computes wrong lengths for kernel 5 when given one."""
    import dataclasses
    import transformers
    import model as M
    torch.manual_seed(seed)
    mc = M.model_config(preset, frontend="wav2vec2", **({} if shared_encoder else {"encoder_layers": 0}))
    mc.w2v.layerdrop = 0.0
    ours = M.SpeechTranslator(mc)
    w = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(mc.w2v).items()
         if k not in ("gradient_checkpointing", "feature_grad_mult")}
    enc = transformers.Wav2Vec2Config(**w, add_adapter=True, num_adapter_layers=mc.adaptor_layers, adapter_kernel_size=5,
                                      adapter_stride=2, output_hidden_size=mc.d_model)
    dec = transformers.MBartConfig(vocab_size=mc.vocab_size, d_model=mc.d_model, decoder_layers=mc.decoder_layers,
                                   decoder_attention_heads=mc.n_heads, decoder_ffn_dim=mc.ffn_dim, dropout=mc.dropout,
                                   attention_dropout=mc.attention_dropout, activation_dropout=mc.activation_dropout,
                                   activation_function="relu", scale_embedding=True, max_position_embeddings=1024,
                                   is_decoder=True, add_cross_attention=True, tie_word_embeddings=True,
                                   pad_token_id=data.PAD_ID, bos_token_id=data.BOS_ID, eos_token_id=data.EOS_ID,
                                   decoder_start_token_id=data.EOS_ID)
    hf = transformers.SpeechEncoderDecoderModel(encoder=transformers.Wav2Vec2Model(enc),
                                                decoder=transformers.MBartForCausalLM(dec))
    hf.config.decoder_start_token_id, hf.config.pad_token_id = data.EOS_ID, data.PAD_ID
    return ours.to(DEVICE), hf.to(DEVICE)


def _hf_steps(ours, hf, batch, bf16: bool) -> tuple:
    """Closures of one optimiser step (forward, summed cross-entropy of the ST targets, backward, Adam)."""
    import torch.nn.functional as F
    import model as M
    prev = M.shift_right(batch.tgt)

    def ce(logits):
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.tgt.flatten(), ignore_index=data.PAD_ID, reduction="sum")

    def make(m, logits):
        opt = torch.optim.Adam(m.parameters(), 1e-5, fused=True)    # ours: train.py's; HF: its Trainer's default

        def step():
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
                loss = ce(logits())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    return (make(ours.train(), lambda: ours(batch, tasks=("st",)).logits["st"]),
            make(hf.train(), lambda: hf(input_values=batch.audio, decoder_input_ids=prev,
                                        decoder_attention_mask=(prev != data.PAD_ID).long()).logits))


HF_BATCH = {"tiny": (26, 1.6, 3.0), "base": (4, 2.0, 4.0)}      # utterances, shortest and longest seconds
HF_BATCH_CUDA = {"tiny": (64, 1.6, 3.0), "base": (16, 2.0, 8.0)}  # a GPU needs more work per step to fill


def _hf_batch(preset: str) -> tuple:
    return (HF_BATCH_CUDA if DEVICE.type == "cuda" else HF_BATCH)[preset]


def _size(m) -> str:
    return f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M"


def bench_hf_step(cfg: BenchConfig, reps: int = 3, presets=("tiny", "base")) -> list:
    """Three models per row group: ours (the ConST model: wav2vec2, adaptor, shared encoder, decoder), ours
    with HF's architecture (no shared encoder: like for like) and HF's, timed interleaved."""
    rows = []
    for preset in presets:
        ours, hf = _hf_pair(preset)
        same = _hf_pair(preset, shared_encoder=False)[0]
        batch = _audio_batch(*_hf_batch(preset))
        for bf16 in _precisions():
            step_ours, step_hf = _hf_steps(ours, hf, batch, bf16)
            t_ours, t_same, t_hf = _time_interleaved([step_ours, _hf_steps(same, hf, batch, bf16)[0], step_hf], reps)
            p = "bf16" if bf16 else "fp32"
            rows += [(f"{preset} {p}: ours, ConST model ({_size(ours)})", t_ours, t_ours / t_hf),
                     (f"{preset} {p}: ours, HF's architecture ({_size(same)})", t_same, t_same / t_hf),
                     (f"{preset} {p}: HF SpeechEncoderDecoderModel ({_size(hf)})", t_hf, 1.0)]
    t, b = _hf_batch("tiny"), _hf_batch("base")
    _table(f"training step (ST cross-entropy, Adam) against Hugging Face, wav2vec2 front end, tiny: {t[0]} x "
           f"{t[1]}-{t[2]} s, base: {b[0]} x {b[1]}-{b[2]} s, {_where()} (ratio = ours / HF's time; goal <= 0.8)",
           rows, "s/step")
    return rows


def bench_generate(cfg: BenchConfig, length: int = 20, beam: int = 5, reps: int | None = None, presets=("tiny", "base"),
                   precisions: tuple | None = None) -> list:
    """Beam search from audio (encoder included), both forced to `length` new tokens (end of sentence
    suppressed: HF by min_new_tokens, ours by a -inf logit), so time per sentence compares like with like;
    in fp32 and under bf16 autocast (as evaluate.py decodes when training picked bf16), for both.
    precisions: the bf16 flags to run (default _precisions())."""
    rows = []
    for preset in presets:
        ours, hf = _hf_pair(preset)
        same = _hf_pair(preset, shared_encoder=False)[0]
        n = (8 if preset == "tiny" else 4) * (8 if DEVICE.type == "cuda" else 1)
        batch = _audio_batch(n, 2.0, 3.0)
        counts = {}

        def searcher(m, name, bf16):
            m.eval()
            decode = m.decode

            def no_eos(*a, **k):
                logits = decode(*a, **k)
                logits[..., data.EOS_ID] = float("-inf")
                return logits

            @torch.no_grad()
            def run():
                m.decode = no_eos
                try:
                    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
                        low, lens = m.encode_speech(batch.audio, batch.audio_lens)
                        hyps = m.generate(m.encode(low, lens), lens, 6, beam=beam, max_len_a=0, max_len_b=length + 1)
                finally:
                    del m.decode
                counts[name] = sum(map(len, hyps)) / n
            return run

        def hf_searcher(bf16):
            @torch.no_grad()
            def run():
                with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
                    out = hf.eval().generate(input_values=batch.audio, num_beams=beam, do_sample=False,
                                             min_new_tokens=length, max_new_tokens=length,
                                             decoder_start_token_id=data.EOS_ID, eos_token_id=data.EOS_ID,
                                             pad_token_id=data.PAD_ID)
                counts["hf"] = out.shape[1] - 1
            return run

        def encoder_alone(bf16):                  # the floor of ours' search: its speech encoder, no decoding
            @torch.no_grad()
            def run():
                with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
                    same.encode(*same.encode_speech(batch.audio, batch.audio_lens))
            return run
        for bf16 in precisions or _precisions():
            p = "bf16" if bf16 else "fp32"
            n_reps = reps or (9 if preset == "tiny" else 3)      # a tiny search takes 0.1-0.3 s: more rounds, less noise
            t_ours, t_same, t_enc, t_hf = _time_interleaved([searcher(ours, "ours", bf16), searcher(same, "same", bf16),
                                                             encoder_alone(bf16), hf_searcher(bf16)], n_reps)
            rows += [(f"{preset} {p}: ours, ConST model, {counts['ours']:.0f} tokens/sentence", t_ours / n,
                      t_ours / t_hf),
                     (f"{preset} {p}: ours, HF's architecture, {counts['same']:.0f} tokens", t_same / n, t_same / t_hf),
                     (f"{preset} {p}: ours, HF's architecture, its encoder alone (no search)", t_enc / n, t_enc / t_hf),
                     (f"{preset} {p}: HF generate, {counts['hf']:.0f} tokens/sentence", t_hf / n, 1.0)]
    _table(f"beam search ({beam} beams) from audio against Hugging Face's generate, {_where()} "
           f"(ratio = ours / HF's time; goal <= 0.7)", rows, "s/sentence")
    return rows


def _matmul_peak(bf16: bool, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n x n matrix product (a @ b) in this precision: the reachable peak that MFU divides by."""
    dt = torch.bfloat16 if bf16 else torch.float32
    n = 8192 if DEVICE.type == "cuda" else n
    a, b = torch.randn(n, n, dtype=dt, device=DEVICE), torch.randn(n, n, dtype=dt, device=DEVICE)
    return 2 * n ** 3 / _time(lambda: a @ b, reps)


def _count_flops(fn) -> int:
    """FLOPs of fn() (its matrix products and convolutions, forward and backward) by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_mfu(cfg: BenchConfig, reps: int = 3, presets=("tiny", "base")) -> list:
    """Model FLOP utilisation: FLOPs of one training step (torch.utils.flop_counter) / its time, divided by
    a matrix product's FLOP/s measured in the same run and precision."""
    bf16 = _train_bf16()
    steps = {}
    if "tiny" in presets:
        steps["tiny (the main job's step: log-mel, const, 26 utterances)"] = _tiny_step(bf16=bf16)
    if "base" in presets:
        ours, hf = _hf_pair("base")
        steps[f"base (wav2vec2, ST, {_hf_batch('base')[0]} utterances)"] = \
            _hf_steps(ours, hf, _audio_batch(*_hf_batch("base")), bf16)[0]
    peak = _matmul_peak(bf16)
    rows = []
    for name, step in steps.items():
        step()
        flops = _count_flops(step)
        t = _time(step, reps)
        rows.append((name, flops / t / 1e9, flops / t / peak))
    n = 8192 if DEVICE.type == "cuda" else 2048
    print(f"\n## model FLOP utilisation, {'bf16' if bf16 else 'fp32'}, {_where()}; peak = a {n}^2 "
          f"matrix product here: {peak / 1e9:.0f} GFLOP/s (goal: base >= 30 % on a CPU, >= 40 % on a GPU)")
    print(f"| {'step':<62} | {'GFLOP/s':>8} | {'MFU':>6} |\n|{'-' * 64}|{'-' * 10}|{'-' * 8}|")
    for name, g, mfu in rows:
        print(f"| {name:<62} | {g:>8.1f} | {mfu * 100:>5.1f}% |")
    return rows


BENCHES = {"data": bench_data, "wav2vec2": bench_wav2vec2, "decode": bench_decode, "sinkhorn": bench_sinkhorn,
           "train_step": bench_train_step, "precision": bench_precision, "hf_step": bench_hf_step,
           "generate": bench_generate, "mfu": bench_mfu}
GPU_ROWS = ("wav2vec2", "decode", "train_step", "hf_step", "generate", "mfu")   # the others measure CPU code


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, v in BenchConfig.__dataclass_fields__.items():
        p.add_argument(f"--{k}", type=type(v.default), default=v.default)
    cfg = BenchConfig(**vars(p.parse_args()))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    global DEVICE
    DEVICE = torch.device(cfg.device)
    if cfg.only and cfg.only not in BENCHES:
        p.error(f"--only={cfg.only}: choose one of {', '.join(BENCHES)}")
    if cfg.only and DEVICE.type != "cpu" and cfg.only not in GPU_ROWS:
        p.error(f"--only={cfg.only} measures CPU code; on {cfg.device} choose one of {', '.join(GPU_ROWS)}")
    for name, run in BENCHES.items():
        if cfg.only in ("", name) and (DEVICE.type == "cpu" or name in GPU_ROWS):
            run(cfg)


if __name__ == "__main__":
    main()
