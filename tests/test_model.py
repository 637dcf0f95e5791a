"""Tests of model.py: wav2vec2 against Hugging Face's, checkpoint loading, the ConST model, generation."""
import argparse

import pytest
import torch
import torch.nn.functional as F

import data
import model
from model import Wav2Vec2Config, Wav2Vec2Model, load_wav2vec2


SMALL = dict(conv_dim=[32, 32, 32], conv_kernel=[10, 3, 2], conv_stride=[5, 2, 2], hidden_size=48,
             num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=4)


def hf_model(tmp_path, base: bool = False, legacy_weight_norm: bool = False, **over):
    """A randomly initialised HF Wav2Vec2Model, saved with save_pretrained; returns (model, folder)."""
    transformers = pytest.importorskip("transformers")   # test-only reference, in requirements.txt
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(**({} if base else SMALL), **over)
    ref = transformers.Wav2Vec2Model(cfg).eval()
    with torch.no_grad():              # move norms and biases away from their trivial init
        for name, p in ref.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / ("base" if base else "small")
    ref.save_pretrained(folder)
    if legacy_weight_norm:             # older checkpoints such as facebook/wav2vec2-base: weight_g / weight_v
        from safetensors.torch import load_file, save_file
        state = load_file(str(folder / "model.safetensors"))
        for new, old in (("parametrizations.weight.original0", "weight_g"), ("parametrizations.weight.original1", "weight_v")):
            state[f"encoder.pos_conv_embed.conv.{old}"] = state.pop(f"encoder.pos_conv_embed.conv.{new}")
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / "pytorch_model.bin")
    return ref, folder


@torch.no_grad()
def hf_run(ref, audio):
    return ref(audio).last_hidden_state


@pytest.mark.parametrize("legacy", [False, True])
def test_hf_parity_single_utterances(tmp_path, legacy):
    ref, folder = hf_model(tmp_path, legacy_weight_norm=legacy)
    ours = load_wav2vec2(folder / ("pytorch_model.bin" if legacy else "model.safetensors")).eval()
    for n in (400, 1234, 4000):
        audio = torch.randn(1, n)
        with torch.no_grad():
            y, lens = ours(audio)
        expect = hf_run(ref, audio)
        assert y.shape == expect.shape and int(lens[0]) == expect.shape[1]
        assert (y - expect).abs().max() <= 1e-4


def test_hf_parity_padded_batch_equals_unpadded_runs(tmp_path):
    ref, folder = hf_model(tmp_path)
    ours = load_wav2vec2(folder).eval()
    lens = torch.tensor([4000, 2500, 1111])
    audio = torch.randn(3, 4000)
    audio[1, 2500:] = 0
    audio[2, 1111:] = 0
    with torch.no_grad():
        y, out_lens = ours(audio, lens)
    assert out_lens.tolist() == ref._get_feat_extract_output_lengths(lens).tolist()
    for i, n in enumerate(lens.tolist()):
        expect = hf_run(ref, audio[i:i + 1, :n])[0]
        assert (y[i, :out_lens[i]] - expect).abs().max() <= 1e-4
    # HF itself, given the padded batch, differs: its group norm counts the padding (documented in model.py)
    with torch.no_grad():
        hf_batch = ref(audio, attention_mask=(torch.arange(4000)[None] < lens[:, None]).long()).last_hidden_state
    assert (hf_batch[2, :out_lens[2]] - hf_run(ref, audio[2:3, :1111])[0]).abs().max() > 1e-3


def test_hf_parity_base_shapes(tmp_path):
    ref, folder = hf_model(tmp_path, base=True)
    ours = load_wav2vec2(folder).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    audio = torch.randn(1, 16000)
    with torch.no_grad():
        assert (ours(audio)[0] - hf_run(ref, audio)).abs().max() <= 1e-4


class Evil:
    """Stands for any pickled object a checkpoint should not be allowed to carry."""


def fairseq_checkpoint(ref, path, args: bool = True):
    """Write HF weights under fairseq's key names, as wav2vec_small.pt stores them."""
    inverse = {v: k for k, v in model._expand(model.FAIRSEQ_TO_HF, len(SMALL["conv_dim"]),
                                                SMALL["num_hidden_layers"]).items()}
    state = {}
    for k, v in ref.state_dict().items():
        k = model.HF_RENAMES.get(k, k)
        state[inverse[k]] = v.clone()
    state["quantizer.vars"] = torch.randn(1, 8, 4)          # pre-training heads are dropped on purpose
    state["final_proj.weight"] = torch.randn(4, 48)
    spec = "[(32, 10, 5), (32, 3, 2), (32, 2, 2)]"
    m = dict(extractor_mode="default", layer_norm_first=False, conv_feature_layers=spec, conv_bias=False,
             encoder_embed_dim=48, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_embed_dim=96,
             conv_pos=16, conv_pos_groups=4, encoder_layerdrop=0.05, feature_grad_mult=0.1)
    ckpt = {"model": state, "args": argparse.Namespace(**m)} if args else {"model": state, "cfg": {"model": m}}
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("args", [True, False])
def test_fairseq_checkpoint_loads(tmp_path, args):
    ref, _ = hf_model(tmp_path)
    path = fairseq_checkpoint(ref, tmp_path / "wav2vec_small.pt", args)
    ours = load_wav2vec2(path).eval()
    audio = torch.randn(1, 3000)
    with torch.no_grad():
        assert (ours(audio)[0] - hf_run(ref, audio)).abs().max() <= 1e-4
    assert ours.cfg.feature_grad_mult == 0.1                      # the checkpoint's args, as ConST builds it
    assert load_wav2vec2(tmp_path / "small").cfg.feature_grad_mult == 1.0     # HF's config has none


def test_feature_grad_mult_scales_the_feature_encoders_gradient_only(tmp_path):
    """fairseq's feature_grad_mult: the same forward; the convolutions' gradients times the factor, every
    other gradient unchanged; 0 freezes the convolutions (no gradient at all). The translator's checkpoints
    record the loaded wav2vec2's config."""
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in SMALL.items()}, hidden_dropout=0.0,
                         attention_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)
    w2v = Wav2Vec2Model(cfg).train()
    audio = torch.randn(2, 4000)
    runs = {}
    for mult in (1.0, 0.1, 0.0):
        w2v.cfg.feature_grad_mult = mult
        w2v.zero_grad(set_to_none=True)
        y, _ = w2v(audio)
        y.pow(2).mean().backward()
        runs[mult] = (y.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in w2v.named_parameters()})
    conv = [n for n in runs[1.0][1] if n.startswith("feature_extractor.")]
    rest = [n for n in runs[1.0][1] if n not in conv and runs[1.0][1][n] is not None]
    assert conv and rest and torch.equal(runs[0.1][0], runs[1.0][0]) and torch.equal(runs[0.0][0], runs[1.0][0])
    for n in conv:                                  # tolerances relative to each gradient's own size
        g = runs[1.0][1][n]
        assert g.abs().max() > 0 and runs[0.0][1][n] is None
        torch.testing.assert_close(runs[0.1][1][n], 0.1 * g, rtol=1e-3, atol=1e-4 * float(g.abs().max()))
    for n in rest:
        g = runs[1.0][1][n]
        torch.testing.assert_close(runs[0.1][1][n], g, rtol=1e-3, atol=1e-4 * float(g.abs().max()))
    ref, _ = hf_model(tmp_path)
    path = fairseq_checkpoint(ref, tmp_path / "wav2vec_small.pt", True)
    st = model.SpeechTranslator(model.model_config("tiny", frontend="wav2vec2", w2v_path=str(path)))
    assert st.cfg.w2v.feature_grad_mult == 0.1 and st.cfg.w2v.hidden_size == 48


def test_bad_checkpoints_name_the_key(tmp_path):
    ref, _ = hf_model(tmp_path)
    path = fairseq_checkpoint(ref, tmp_path / "w.pt")
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"]["encoder.layers.0.surprise"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "unexpected.pt")
    with pytest.raises(data.BadInput, match="unexpected key 'encoder.layers.0.surprise'"):
        load_wav2vec2(tmp_path / "unexpected.pt")
    del ckpt["model"]["encoder.layers.0.surprise"]
    del ckpt["model"]["encoder.layers.1.fc2.bias"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(data.BadInput, match=r"missing keys \['encoder.layers.1.feed_forward.output_dense.bias'\]"):
        load_wav2vec2(tmp_path / "missing.pt")
    ckpt["model"]["encoder.layers.1.fc2.bias"] = torch.zeros(7)
    torch.save(ckpt, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"'encoder.layers.1.fc2.bias' has shape \(7,\)"):
        load_wav2vec2(tmp_path / "shape.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_wav2vec2(tmp_path / "nothing.pt")
    # an arbitrary pickled object is refused by weights_only loading
    torch.save({"model": {}, "args": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_wav2vec2(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="unsupported expression"):
        model._conv_layers_spec("__import__('os').system('true')")


def test_conv_lengths_and_masked_group_norm():
    cfg = Wav2Vec2Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in SMALL.items()})
    lens = torch.tensor([400, 401, 1234, 5000])
    expect = []
    for n in lens.tolist():
        for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
            n = (n - k) // s + 1
        expect.append(n)
    assert model.conv_out_lengths(lens, cfg.conv_kernel, cfg.conv_stride).tolist() == expect
    norm = torch.nn.GroupNorm(8, 8)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 50)
    assert torch.allclose(model.masked_group_norm(x, norm, None), norm(x), atol=1e-5)
    mask = torch.arange(50)[None] >= torch.tensor([50, 30])[:, None]
    y = model.masked_group_norm(x, norm, mask)
    assert torch.allclose(y[1, :, :30], norm(x[1:2, :, :30])[0], atol=1e-5)


def test_finetuning_switches(tmp_path):
    cfg = Wav2Vec2Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in SMALL.items()})
    m = Wav2Vec2Model(cfg)
    m.freeze_feature_encoder()
    audio = torch.randn(2, 3000)
    m.train()
    m(audio)[0].sum().backward()
    assert all(p.grad is None for p in m.feature_extractor.parameters())
    assert m.feature_projection.projection.weight.grad is not None
    # gradient checkpointing gives the same gradients
    torch.manual_seed(0)
    a = Wav2Vec2Model(Wav2Vec2Config(**{**cfg.__dict__, "layerdrop": 0.0, "hidden_dropout": 0.0,
                                        "attention_dropout": 0.0, "feat_proj_dropout": 0.0})).train()
    b = Wav2Vec2Model(Wav2Vec2Config(**{**a.cfg.__dict__, "gradient_checkpointing": True})).train()
    b.load_state_dict(a.state_dict())
    a(audio)[0].pow(2).sum().backward()
    b(audio)[0].pow(2).sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if n == "masked_spec_embed":          # unused without time masking
            assert p.grad is None and q.grad is None
            continue
        assert torch.allclose(p.grad, q.grad, atol=1e-5), n
    # LayerDrop skips whole layers in training, never in eval
    c = Wav2Vec2Model(Wav2Vec2Config(**{**cfg.__dict__, "layerdrop": 1.0, "hidden_dropout": 0.0,
                                        "attention_dropout": 0.0, "feat_proj_dropout": 0.0}))
    c.train()
    with torch.no_grad():
        x = c.feature_projection(c.feature_extractor(audio).transpose(1, 2))
        skipped = c.encoder.dropout(c.encoder.layer_norm(x + c.encoder.pos_conv_embed(x)))
        assert torch.allclose(c(audio)[0], skipped, atol=1e-6)
        c.eval()
        assert not torch.allclose(c(audio)[0], skipped, atol=1e-3)


# ---------------------------------------------------------------------------------------- the ConST model
def tiny_model(frontend="wav2vec2", vocab=50, **over) -> model.SpeechTranslator:
    torch.manual_seed(0)
    cfg = model.model_config("tiny", vocab_size=vocab, frontend=frontend, **over)
    cfg.w2v.num_hidden_layers, cfg.encoder_layers, cfg.decoder_layers = 1, 2, 2
    return model.SpeechTranslator(cfg).eval()


def fake_batch(B=3, vocab=50, seed=0):
    import data
    g = torch.Generator().manual_seed(seed)
    audio_lens = torch.tensor([16000, 9000, 5000][:B])
    audio = torch.randn(B, 16000, generator=g) * 0.1
    audio = audio.masked_fill(data.lengths_to_padding_mask(audio_lens), 0.0)
    def seqs(lang, lens):
        rows = [[lang] + torch.randint(6, vocab, (n - 2,), generator=g).tolist() + [data.EOS_ID] for n in lens]
        return data.pad_sequences(rows, data.PAD_ID)
    src, src_lens = seqs(4, [9, 7, 5][:B])
    tgt, tgt_lens = seqs(5, [10, 6, 8][:B])
    return data.Batch([f"u{i}" for i in range(B)], audio, audio_lens, src, src_lens, tgt, tgt_lens)


def test_parameter_counts():
    base = model.SpeechTranslator(model.model_config("base"))
    n = sum(p.numel() for p in base.parameters())
    assert 145e6 < n < 155e6                                 # "about 150M parameters" (ConST §4.1)
    assert base.embed_tokens.weight.shape == (10_000, 512)
    tiny = model.SpeechTranslator(model.model_config("tiny"))
    assert sum(p.numel() for p in tiny.parameters()) < n / 10
    with pytest.raises(KeyError, match="unknown model preset"):
        model.model_config("huge")


def test_length_adaptor_lengths_and_padding():
    ad = model.LengthAdaptor(16, 32, 8).eval()
    lens = torch.tensor([1, 2, 5, 17, 40])
    x = torch.randn(5, 40, 16)
    y, out = ad(x, lens)
    f = lambda L: (L - 1) // 2 + 1
    assert out.tolist() == [f(f(n)) for n in lens.tolist()] and y.shape == (5, f(f(40)), 8)
    for i, n in enumerate(lens.tolist()):                    # a padded item equals its unpadded run
        alone, _ = ad(x[i:i + 1, :n], lens[i:i + 1])
        assert torch.allclose(y[i, :out[i]], alone[0], atol=1e-6)


@pytest.mark.parametrize("frontend", ["wav2vec2", "logmel"])
def test_speech_encoding_is_padding_invariant(frontend):
    m = tiny_model(frontend)
    b = fake_batch()
    with torch.no_grad():
        low, lens = m.encode_speech(b.audio, b.audio_lens)
        high = m.encode(low, lens)
        for i in range(3):
            n = int(b.audio_lens[i])
            low_i, lens_i = m.encode_speech(b.audio[i:i + 1, :n], b.audio_lens[i:i + 1])
            assert int(lens_i) == int(lens[i]) and low_i.shape[1] == int(lens[i])
            assert (low[i, :lens[i]] - low_i[0]).abs().max() < 1e-4
            assert (high[i, :lens[i]] - m.encode(low_i, lens_i)[0]).abs().max() < 1e-4
    assert low.shape[-1] == m.cfg.d_model


def test_forward_outputs_and_tied_embeddings():
    m = tiny_model()
    b = fake_batch()
    out = m(b)
    assert set(out.logits) == {"st", "asr", "mt"}
    assert out.logits["st"].shape == (*b.tgt.shape, 50) and out.logits["asr"].shape == (*b.src.shape, 50)
    assert torch.equal(out.targets["mt"], b.tgt) and torch.equal(out.targets["asr"], b.src)
    assert out.text_low.shape == (*b.src.shape, m.cfg.d_model) and out.speech_high.shape == out.speech_low.shape
    assert model.shift_right(b.tgt)[0, :3].tolist() == [2, 5, b.tgt[0, 1].item()]
    assert (model.shift_right(b.tgt)[b.tgt == 1] == 1).all()
    # one matrix, three uses: a gradient from each path reaches the same tensor
    sum(o.float().pow(2).mean() for o in out.logits.values()).backward()
    assert m.embed_tokens.weight.grad is not None and m.embed_tokens.weight.grad.abs().sum() > 0
    vocab_sized = [n for n, p in m.named_parameters() if 50 in p.shape]
    assert vocab_sized == ["embed_tokens.weight"]              # no separate output projection
    # the decoder cannot look ahead: changing a later target token leaves earlier logits unchanged
    b2 = fake_batch()
    b2.tgt[0, 5] = 7
    with torch.no_grad():
        a, c = m(b, ("mt",)).logits["mt"], m(b2, ("mt",)).logits["mt"]
    assert torch.allclose(a[0, :5], c[0, :5], atol=1e-5) and not torch.allclose(a[0, 6], c[0, 6], atol=1e-5)


def test_bf16_autocast_forward_is_finite():
    m = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(fake_batch())
    assert all(torch.isfinite(v.float()).all() for v in out.logits.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, lens = tiny_model("logmel").encode_speech(fake_batch().audio, fake_batch().audio_lens)
    assert torch.isfinite(low.float()).all()


# ---------------------------------------------------------------------------------------- generation
def encoded(m, b):
    with torch.no_grad():
        low, lens = m.encode_text(b.src, b.src_lens)
        return m.encode(low, lens), lens


def test_cached_decoding_equals_full_recomputation():
    m = tiny_model()
    b = fake_batch()
    enc, lens = encoded(m, b)
    prev = model.shift_right(b.tgt)
    with torch.no_grad():
        full = m.decode(prev, enc, lens)
        cache, steps = [], []
        for t in range(prev.shape[1]):
            steps.append(m.decode(prev[:, t:t + 1], enc, lens, cache, offset=t))
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_kv_cache_follows_reordered_beams():
    """_reorder moves each beam's whole past: three beams of one sentence, decoded step by step for 70
    positions with beams reordered after steps 20 and 50 (duplicating one) and twice with no step between
    (after step 60: the two orders compose), give the logits of a full decoder pass over the histories the
    beams end up with."""
    m = tiny_model()
    b = fake_batch()
    enc, lens = encoded(m, b)
    enc, lens = enc[:1, :lens[0]], lens[:1]                    # one sentence, three beams share it
    prev = torch.randint(6, 50, (3, 70), generator=torch.Generator().manual_seed(0))
    orders = {20: [torch.tensor([2, 0, 1])], 50: [torch.tensor([1, 1, 0])], 60: [torch.tensor([0, 2, 1]), torch.tensor([2, 2, 0])]}
    cache, steps, hist = [], [], prev[:, :0]
    with torch.no_grad():
        for t in range(70):
            for order in orders.get(t, []):
                model.SpeechTranslator._reorder(cache, order)
                hist = hist[order]
            hist = torch.cat([hist, prev[:, t:t + 1]], 1)
            steps.append(m.decode(prev[:, t:t + 1], enc, lens, cache, offset=t)[:, 0])
        full = m.decode(hist, enc, lens)
    assert cache[0]["self"]["k"].shape[2] == 70
    assert (torch.stack(steps[60:], 1) - full[:, 60:]).abs().max() <= 1e-5
    assert (torch.stack(steps[:60], 1)[0] - full[0, :60]).abs().max() > 1e-3   # the reorders mattered


def naive_greedy(m, enc, lens, lang, max_len):
    """Reference: recompute the whole prefix every step, no cache."""
    out = []
    tokens = torch.tensor([[2, lang]])
    for _ in range(max_len):
        logits = m.decode(tokens, enc, lens)[0, -1]
        logits[1] = float("-inf")
        t = int(logits.argmax())
        if t == 2 or len(out) + 2 > max_len:
            break
        out.append(t)
        tokens = torch.cat([tokens, torch.tensor([[t]])], 1)
    return out


def test_greedy_beam1_and_forced_tag():
    m = tiny_model()
    b = fake_batch()
    enc, lens = encoded(m, b)
    greedy = m.greedy(enc, lens, lang_id=5, max_len_a=0, max_len_b=12)
    assert greedy == m.generate(enc, lens, lang_id=5, beam=1, max_len_a=0, max_len_b=12)
    with torch.no_grad():
        ref = [naive_greedy(m, enc[i:i + 1, :lens[i]], lens[i:i + 1], 5, 12) for i in range(3)]
    assert greedy == ref
    assert all(0 < len(h) <= 11 for h in greedy) and all(2 not in h and 1 not in h for h in greedy)
    assert m.greedy(enc, lens, lang_id=4, max_len_a=0, max_len_b=12) != greedy       # the tag steers


def test_beam_search_batch_equals_single_and_cache_equals_no_cache():
    m = tiny_model()
    b = fake_batch()
    enc, lens = encoded(m, b)
    batch = m.generate(enc, lens, lang_id=5, beam=4, max_len_a=0, max_len_b=10)
    singles = [m.generate(enc[i:i + 1, :lens[i]], lens[i:i + 1], lang_id=5, beam=4, max_len_a=0, max_len_b=10)[0]
               for i in range(3)]
    assert batch == singles
    assert batch == m.generate(enc, lens, lang_id=5, beam=4, max_len_a=0, max_len_b=10, use_cache=False)


def test_beam_search_with_the_cache_feeds_one_new_token_a_step_and_equals_the_recomputation():
    """With the KV cache, the first decoder pass reads the prefix `</s> <lang>` and each later pass one new
    token per beam. With </s> suppressed (every hypothesis runs to the length limit), the hypotheses equal
    those of the no-cache recomputation, which feeds the whole prefix at every step."""
    m = tiny_model()
    enc, lens = encoded(m, fake_batch())
    real, rows = m.decode, []

    def no_eos(tokens, *a, **k):
        rows.append(tuple(tokens.shape))
        logits = real(tokens, *a, **k)
        logits[..., 2] = float("-inf")
        return logits
    m.decode = no_eos
    try:
        cached = m.generate(enc, lens, lang_id=5, beam=4, max_len_a=0, max_len_b=9)
        calls, rows[:] = list(rows), []
        full = m.generate(enc, lens, lang_id=5, beam=4, max_len_a=0, max_len_b=9, use_cache=False)
    finally:
        del m.decode
    assert cached == full and all(len(h) == 8 for h in cached)       # 9 tokens after </s>: the tag and 8
    assert calls == [(12, 2)] + [(12, 1)] * 8                         # 8 tokens, then the forced </s>
    assert rows == [(12, n) for n in range(2, 11)]                    # the reference: the whole prefix each step

def test_beam_search_finds_a_better_sequence_than_greedy():
    """Beam search maximises the length-normalised log-probability; check against exhaustive scoring."""
    m = tiny_model(vocab=8)
    b = fake_batch(vocab=8)
    enc, lens = encoded(m, b)
    enc, lens = enc[:1, :lens[0]], lens[:1]

    def score(hyp):
        tokens = torch.tensor([[2, 5] + hyp])
        with torch.no_grad():
            logp = torch.log_softmax(m.decode(tokens, enc, lens)[0].float(), -1)
        ids = hyp + [2]
        return sum(logp[1 + i, t].item() for i, t in enumerate(ids)) / len(ids)

    greedy = m.greedy(enc, lens, 5, max_len_a=0, max_len_b=5)[0]
    beam = m.generate(enc, lens, 5, beam=6, max_len_a=0, max_len_b=5)[0]
    assert score(beam) >= score(greedy) - 1e-6


def test_pretrained_wav2vec2_inside_the_translator_and_freezing(tmp_path):
    ref, folder = hf_model(tmp_path)
    cfg = model.model_config("tiny", vocab_size=50, w2v_path=str(folder), adaptor_channels=64, d_model=32,
                             n_heads=4, ffn_dim=64, encoder_layers=1, decoder_layers=1)
    m = model.SpeechTranslator(cfg).eval()
    audio = torch.randn(1, 3000)
    with torch.no_grad():
        assert (m.wav2vec2(audio)[0] - hf_run(ref, audio)).abs().max() <= 1e-4
    m.train()
    m.freeze_wav2vec2()
    m(fake_batch(), ("st",)).logits["st"].float().pow(2).mean().backward()
    assert all(p.grad is None for p in m.wav2vec2.parameters())
    assert m.subsample.conv_layers[0].weight.grad is not None
    m.freeze_wav2vec2(False)
    m.zero_grad()
    m.wav2vec2.encoder.cfg.layerdrop = 0.0      # a dropped layer 0 would have no gradient for a reason other than freezing
    m(fake_batch(), ("st",)).logits["st"].float().pow(2).mean().backward()
    assert m.wav2vec2.encoder.layers[0].attention.q_proj.weight.grad is not None
    # a checkpoint records the loaded wav2vec2's shape (48 wide, not the tiny preset's 256): it rebuilds
    import dataclasses
    again = model.SpeechTranslator.from_checkpoint({"model": m.state_dict(), "model_config": dataclasses.asdict(m.cfg)})
    assert again.cfg.w2v.hidden_size == 48 and again.cfg.w2v_path == ""


def test_stacked_decoder_pass_equals_one_pass_per_task():
    """forward() decodes ST, ASR and MT rows in one pass; right-padding the shorter targets and
    encoder states must leave every valid position's logits as a separate pass computes them."""
    torch.manual_seed(0)
    m = model.SpeechTranslator(model.model_config("tiny", vocab_size=100, frontend="logmel", dropout=0.0,
                                                  attention_dropout=0.0, activation_dropout=0.0)).eval()
    jobs = {"st": (torch.randint(4, 100, (3, 7)), torch.randn(3, 11, 256), torch.tensor([11, 5, 8])),
            "asr": (torch.randint(4, 100, (3, 5)), torch.randn(3, 11, 256), torch.tensor([11, 5, 8])),
            "mt": (torch.randint(4, 100, (2, 9)), torch.randn(2, 6, 256), torch.tensor([6, 3]))}
    stacked = m.decode_stacked(jobs)
    for task, job in jobs.items():
        alone = m.decode(*job)
        assert stacked[task].shape == alone.shape
        torch.testing.assert_close(stacked[task], alone, atol=1e-5, rtol=1e-5)
    assert m.decode_stacked({"st": jobs["st"]})["st"].shape == (3, 7, 100)



def test_length_penalty_ranks_finished_hypotheses_by_logprob_over_length_to_the_power():
    """Two hypotheses: `</s>` at once (log p = log 0.3, length 1) and `5 </s>` (log 0.6 + log 0.4, length 2).
    Ranked by log p / length ** lenpen: with lenpen 0 the short one wins (-1.20 > -1.43), with 1 the long one
    (-0.71 > -1.20); they tie at lenpen = log2(1.427 / 1.204) = 0.245, so 0.2 keeps the short one and 0.3
    takes the long one (-1.43 / 2 ** 0.3 = -1.16)."""
    m = tiny_model(vocab=8)
    enc, lens = encoded(m, fake_batch(B=1, vocab=8))
    first = torch.full((8,), 0.1 / 6).index_put_((torch.tensor([2]),), torch.tensor(0.3))
    first[5] = 0.6
    after_5 = torch.full((8,), 0.6 / 7).index_put_((torch.tensor([2]),), torch.tensor(0.4))

    def decode(tokens, *a, **k):          # the distribution depends on the last token only
        rows = [after_5 if t == 5 else first for t in tokens[:, -1].tolist()]
        return torch.stack(rows).log()[:, None].expand(-1, tokens.shape[1], -1)
    m.decode = decode
    picks = {lp: m.generate(enc, lens, lang_id=4, beam=2, max_len_b=6, len_penalty=lp, use_cache=False)[0]
             for lp in (0.0, 0.2, 0.3, 0.7, 1.0)}
    assert picks == {0.0: [], 0.2: [], 0.3: [5], 0.7: [5], 1.0: [5]}
