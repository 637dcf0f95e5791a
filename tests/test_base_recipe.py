"""The paper's recipe path on a CPU: the `base` preset (wav2vec2 base, 150M parameters) with the paper's
settings (wav2vec2 front end, ASR re-encoding, gradient accumulation 2, wav2vec2 frozen for the first
updates), a few steps on the tiny corpus (finite and falling losses, checkpoint, exact resume), so that a
GPU user meets no bug that a CPU could have found."""
import math

import torch

import model as M
import train


def base_config(corpus, out_dir, **over) -> train.TrainConfig:
    """`--preset=base --recipe=const` as the command line builds it, shrunk only where a CPU needs it."""
    args = {"preset": "base", "recipe": "const", "data": str(corpus), "out_dir": str(out_dir), "vocab_size": 200,
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


def test_base_recipe_in_bf16_trains_wav2vec2_through_the_matrix_product_convolutions(tiny_corpus, tmp_path,
                                                                                       monkeypatch):
    """bf16 on a CPU takes the feature encoder's one-sequence matrix-product path (model.StridedConv1dMatmul);
    the recipe still learns there, and every convolution's weights train once wav2vec2 is unfrozen."""
    grads = []
    real = M.StridedConv1dMatmul.apply
    monkeypatch.setattr(M.StridedConv1dMatmul, "apply", lambda *a: grads.append(a[1].requires_grad) or real(*a))
    out = train.train(base_config(tiny_corpus, tmp_path / "a", bf16="true"))
    first, last = out["history"][0], out["history"][-1]
    assert all(math.isfinite(v) for h in out["history"] for v in h.values())
    assert all(last[task] < 0.8 * first[task] for task in ("st", "asr", "mt")), (first, last)
    assert len(grads) >= 4 * 7 and any(grads) and not all(grads)     # every step and layer; frozen, then not
    frozen = train.train(base_config(tiny_corpus, tmp_path / "b", bf16="true", max_steps=2))
    assert frozen["history"] == out["history"][:2]
    before, after = (M.load_checkpoint(tmp_path / n / "last.pt")["model"] for n in ("b", "a"))
    for i in range(7):
        k = f"wav2vec2.feature_extractor.conv_layers.{i}.conv.weight"
        assert not torch.equal(before[k], after[k]) and torch.isfinite(after[k]).all(), k
