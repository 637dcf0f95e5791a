"""Tests of model.py: wav2vec2 written from scratch against Hugging Face's, and checkpoint loading."""
import argparse

import pytest
import torch

import model
from model import Wav2Vec2Config, Wav2Vec2Model, load_wav2vec2

transformers = pytest.importorskip("transformers")   # test-only reference, in requirements.txt

SMALL = dict(conv_dim=[32, 32, 32], conv_kernel=[10, 3, 2], conv_stride=[5, 2, 2], hidden_size=48,
             num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=4)


def hf_model(tmp_path, base: bool = False, legacy_weight_norm: bool = False, **over):
    """A randomly initialised HF Wav2Vec2Model, saved with save_pretrained; returns (model, folder)."""
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
    ours = load_wav2vec2(folder).eval()
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
             conv_pos=16, conv_pos_groups=4, encoder_layerdrop=0.05)
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


def test_bad_checkpoints_name_the_key(tmp_path):
    ref, _ = hf_model(tmp_path)
    path = fairseq_checkpoint(ref, tmp_path / "w.pt")
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"]["encoder.layers.0.surprise"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "unexpected.pt")
    with pytest.raises(KeyError, match="unexpected key 'encoder.layers.0.surprise'"):
        load_wav2vec2(tmp_path / "unexpected.pt")
    del ckpt["model"]["encoder.layers.0.surprise"]
    del ckpt["model"]["encoder.layers.1.fc2.bias"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(KeyError, match=r"missing keys \['encoder.layers.1.feed_forward.output_dense.bias'\]"):
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
