"""The paper's recipe path on a CPU: the `base` preset (wav2vec2 base, 150M parameters) with the paper's
settings (wav2vec2 front end, ASR re-encoding, gradient accumulation 2, wav2vec2 frozen for the first
updates), a few steps on the tiny corpus (finite and falling losses, checkpoint, exact resume), so that a
GPU user meets no bug that a CPU could have found."""
import dataclasses
import math

import torch

import data
import model as M
import train


def base_config(corpus, out_dir, **over) -> train.TrainConfig:
    """`--preset=base --recipe=const` as the command line builds it, shrunk only where a CPU needs it."""
    args = {"preset": "base", "recipe": "const", "w2v_path": "none", "data": str(corpus), "out_dir": str(out_dir), "vocab_size": 200,
            "max_steps": 4, "freeze_w2v_steps": 2, "warmup": 2, "lr": 1e-4, "batch_seconds": 5.0, "workers": 0,
            "eval_every": 10**9, "final_eval": "false", "bf16": "false", "threads": 1, "seed": 3, "log_every": 1, **over}
    return train.parse_config([f"--{k}={v}" for k, v in args.items()])


def test_base_recipe_trains_freezes_wav2vec2_and_resumes_exactly(tiny_corpus, tmp_path):
    cfg = base_config(tiny_corpus, tmp_path / "a")
    assert (cfg.frontend, cfg.accum, cfg.reencode_asr, cfg.freeze_w2v_steps) == ("wav2vec2", 2, True, 2)
    whole = train.train(cfg)
    assert len(whole["history"]) == 4
    assert all(math.isfinite(v) for h in whole["history"] for v in h.values())
    first, last = whole["history"][0], whole["history"][-1]
    assert all(last[task] < 0.8 * first[task] for task in ("st", "asr", "mt")), (first, last)   # it learns
    one = train.train(base_config(tiny_corpus, tmp_path / "c", max_steps=1))
    two = train.train(base_config(tiny_corpus, tmp_path / "b", max_steps=2))
    step1 = M.load_checkpoint(tmp_path / "c" / "last.pt")["model"]
    step2 = M.load_checkpoint(tmp_path / "b" / "last.pt")["model"]      # before the resume overwrites it
    rest = train.train(base_config(tiny_corpus, tmp_path / "b", max_steps=4, resume=True))
    assert one["history"] == whole["history"][:1] and two["history"] + rest["history"] == whole["history"]
    final, resumed = (M.load_checkpoint(tmp_path / n / "last.pt") for n in ("a", "b"))
    assert final["model_config"]["frontend"] == "wav2vec2"
    assert all(torch.equal(final["model"][k], resumed["model"][k]) for k in final["model"])   # exact resume
    w2v = [k for k in step1 if k.startswith("wav2vec2.")]
    assert len(w2v) > 100
    assert all(torch.equal(step1[k], step2[k]) for k in w2v)                   # frozen for updates 1 and 2
    assert not all(torch.equal(step1[k], step2[k]) for k in step1 if k not in w2v)
    assert not all(torch.equal(step2[k], final["model"][k]) for k in w2v)      # trained from update 3 on


def narrow_base(cfg: train.TrainConfig, vocab_size: int, feature_grad_mult: float) -> M.ModelConfig:
    """The base recipe's model (train.model_config) with its layout kept (wav2vec2 front end: base's 7 bias-free
    convolutions, kernels and strides, the first one's group norm, the positional conv, post-LN layers; the
    length adaptor; the shared encoder and decoder) and its widths and depths cut to a CPU test's size."""
    mcfg = train.model_config(cfg, vocab_size)
    base_w2v = M.Wav2Vec2Config()
    assert mcfg.frontend == "wav2vec2" and (mcfg.w2v.conv_kernel, mcfg.w2v.conv_stride, mcfg.w2v.conv_bias) == (
        base_w2v.conv_kernel, base_w2v.conv_stride, False)
    w2v = dataclasses.replace(mcfg.w2v, conv_dim=(32,) * 7, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=128, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                              layerdrop=0.0, feature_grad_mult=feature_grad_mult)
    return dataclasses.replace(mcfg, w2v=w2v, d_model=64, n_heads=2, ffn_dim=128, encoder_layers=1, decoder_layers=1,
                               adaptor_channels=128)


def test_base_recipe_in_bf16_trains_wav2vec2s_feature_encoder(tiny_corpus, tmp_path):
    """The base recipe's objective (const: ST + re-encoded ASR + MT + the contrastive term) on a padded batch in
    bf16 autocast on a CPU, at small widths, plain torch ops (also a CPU without native bf16: slower, the same
    path): the feature encoder's convolutions run in bf16 over the padded batch, and the gradient reaches every
    one of them, finite, scaled by feature_grad_mult (fairseq's 0.1 for wav2vec_small.pt); none reaches them
    with feature_grad_mult=0 (the rest of wav2vec2 still trains) or while the recipe keeps wav2vec2 frozen
    (the rest of the model still trains). A few updates lower the loss and move every convolution."""
    cfg = base_config(tiny_corpus, tmp_path, bf16="true")
    vocab = data.build_vocab(tiny_corpus, cfg.vocab_size, verbose=False)
    split = data.MustcSplit(tiny_corpus, "train", vocab, verbose=False)
    batch = data.collate([split[i] for i in range(4)])
    assert len(set(batch.audio_lens.tolist())) == 4                     # padded: four lengths
    tasks, tables = ("st", "asr", "mt"), train.text_tables(vocab)
    convs = [f"wav2vec2.feature_extractor.conv_layers.{i}.conv.weight" for i in range(7)]

    def model_with(mult: float) -> M.SpeechTranslator:
        torch.manual_seed(0)
        return M.SpeechTranslator(narrow_base(cfg, len(vocab), mult)).train()

    def loss_and_grads(model, frozen: bool = False) -> tuple:
        model.zero_grad(set_to_none=True)
        model.freeze_wav2vec2(frozen)
        aux = train.build_aligners(cfg, model.cfg.d_model)
        dtypes = []
        hooks = [model.get_submodule(k.removesuffix(".weight")).register_forward_hook(
            lambda m, i, o: dtypes.append(o.dtype)) for k in convs]
        torch.manual_seed(1)                                            # the same dropout in every run
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = train.objective(cfg, model, batch, tasks, 0, aux, tables)
        for h in hooks:
            h.remove()
        # each conv over the whole padded batch, once in the ST pass and once in ASR's re-encoding
        assert cfg.reencode_asr and dtypes == [torch.bfloat16] * 14, dtypes
        loss.backward()
        assert torch.isfinite(loss)
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    model = model_with(1.0)
    _, full = loss_and_grads(model)
    for k in convs:
        assert full[k] is not None and torch.isfinite(full[k]).all() and full[k].abs().sum() > 0, k
    _, tenth = loss_and_grads(model_with(0.1))
    for k in convs:
        ratio = tenth[k].norm() / full[k].norm()
        cos = torch.nn.functional.cosine_similarity(tenth[k].flatten(), full[k].flatten(), dim=0)
        assert 0.09 < ratio < 0.11 and cos > 0.99, (k, ratio.item(), cos.item())
    _, none = loss_and_grads(model_with(0.0))
    w2v = [n for n in none if n.startswith("wav2vec2.")]
    assert all(none[k] is None for k in convs)
    assert all(none[n] is not None for n in w2v if n.startswith("wav2vec2.encoder.layers."))
    _, frozen = loss_and_grads(model, frozen=True)
    assert all(frozen[n] is None for n in w2v)
    assert all(frozen[n] is not None for n in frozen if n.startswith(("decoder_layers.", "subsample.")))

    # a few updates, as the recipe makes them once wav2vec2 is unfrozen
    model.freeze_wav2vec2(False)
    before = {k: model.get_parameter(k).detach().clone() for k in convs}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    losses = []
    for _ in range(4):
        loss, _ = loss_and_grads(model)
        opt.step()
        losses.append(loss)
    assert losses[-1] < losses[0], losses
    for k in convs:
        w = model.get_parameter(k)
        assert torch.isfinite(w).all() and not torch.equal(w, before[k]), k
