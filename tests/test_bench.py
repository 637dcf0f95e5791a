"""bench.py's rows stay runnable: a smoke run of each new row with one repetition (no timing is asserted)."""
import math

import bench


def _finite(rows):
    return rows and all(t > 0 and math.isfinite(t) and r > 0 and math.isfinite(r) for _, t, r in rows)


def test_attention_train_step_and_precision_rows_run(capsys):
    cfg = bench.BenchConfig()
    assert _finite(bench.bench_attention(cfg, reps=1))
    rows = bench.bench_pos_conv(cfg, reps=1)
    assert _finite(rows) and len(rows) == 14 and sum("<- picked" in name for name, _, _ in rows) == 7
    rows = bench.bench_feature_conv(cfg, reps=1)
    assert _finite(rows) and len(rows) == 4 and rows[0][2] == rows[2][2] == 1.0
    rows = bench.bench_linear(cfg, reps=1)
    assert _finite(rows) and len(rows) == 8 and [r for _, _, r in rows[::2]] == [1.0] * 4
    rows = bench.bench_train_step(cfg, reps=1)
    assert _finite(rows) and len(rows) == 7 and rows[0][2] == 1.0
    assert _finite(bench.bench_precision(cfg, reps=1))
    out = capsys.readouterr().out
    assert "tiny training step" in out and "bf16=auto picks" in out


def test_the_peer_step_really_differs():
    """The 'one decoder pass per task' peer must run the per-task path (a bench that compares a
    thing with itself measures nothing): its closure decodes three times."""
    import model as M
    calls = {"n": 0}
    real = M.SpeechTranslator.decode

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)
    M.SpeechTranslator.decode = counting
    try:
        bench._tiny_step(stacked=False, bf16=False)()
        per_task = calls["n"]
        calls["n"] = 0
        bench._tiny_step(stacked=True, bf16=False)()
        assert (per_task, calls["n"]) == (3, 1)
    finally:
        M.SpeechTranslator.decode = real


def test_the_bernoulli_peer_really_uses_torchs_dropout(monkeypatch):
    """The "torch's dropout" peer goes through F.dropout (bernoulli_); the main job's step never does."""
    import torch.nn.functional as F
    real, calls = F.dropout, {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(F, "dropout", counting)
    bench._tiny_step(bf16=False)()
    assert calls["n"] == 0
    bench._tiny_step(bf16=False, rand_dropout=False)()
    assert calls["n"] > 0


def test_the_fused_peer_really_uses_torchs_layer_norm_and_conv(monkeypatch):
    """The "fused LayerNorm, conv" peer goes through nn.LayerNorm's and nn.Conv1d's own forward; the main
    job's step (thread-count invariant) through model.LayerNorm's and model.Conv1d's spelled-out ones."""
    import torch.nn as nn
    calls = {"ln": 0, "conv": 0}
    real_ln, real_conv = nn.LayerNorm.forward, nn.Conv1d.forward

    def ln(self, x):
        calls["ln"] += 1
        return real_ln(self, x)

    def conv(self, x):
        calls["conv"] += 1
        return real_conv(self, x)
    monkeypatch.setattr(nn.LayerNorm, "forward", ln)
    monkeypatch.setattr(nn.Conv1d, "forward", conv)
    bench._tiny_step(bf16=False)()
    assert calls == {"ln": 0, "conv": 0}
    bench._tiny_step(bf16=False, invariant=False)()
    assert calls["ln"] > 0 and calls["conv"] > 0


def test_hugging_face_and_mfu_rows_run(capsys):
    """The rows against Hugging Face (training step, beam search) and the MFU row, tiny shapes, one repetition:
    HF's model is ours without the shared encoder (which it lacks) within 10 % of the parameters (the same
    wav2vec2, adaptor and decoder shapes), and both searches write the forced number of tokens."""
    cfg = bench.BenchConfig()
    ours, hf = bench._hf_pair("tiny")
    n_shared = sum(p.numel() for n, p in ours.named_parameters() if n.startswith(("encoder_layers.", "encoder_layer_norm.")))
    n_ours, n_hf = (sum(p.numel() for p in m.parameters()) for m in (ours, hf))
    assert 0.9 < (n_ours - n_shared) / n_hf < 1.1
    same = bench._hf_pair("tiny", shared_encoder=False)[0]        # the like-for-like row: HF's architecture
    assert not same.encoder_layers and 0.9 < sum(p.numel() for p in same.parameters()) / n_hf < 1.1
    rows = bench.bench_hf_step(cfg, reps=1, presets=("tiny",))
    assert _finite(rows) and len(rows) == 6
    rows = bench.bench_generate(cfg, length=4, reps=1, presets=("tiny",))
    assert _finite(rows) and len(rows) == 8 and all("4 tokens" in name for name, _, _ in rows if "alone" not in name)
    assert rows[2][2] < rows[1][2] and rows[6][2] < rows[5][2]   # the encoder alone: less than the search it starts
    assert [name.split(":")[0] for name, _, _ in rows] == ["tiny fp32"] * 4 + ["tiny bf16"] * 4
    rows = bench.bench_mfu(cfg, reps=1, presets=("tiny",))
    assert len(rows) == 1 and rows[0][1] > 0 and 0 < rows[0][2] < 1.5
    out = capsys.readouterr().out
    assert "against Hugging Face" in out and "model FLOP utilisation" in out


def test_the_feature_conv_peer_really_runs_f_conv1d(monkeypatch):
    """The F.conv1d peer of --only feature_conv runs torch's convolution on every layer; ours none (matrix
    products), and the flags are restored."""
    import torch.nn.functional as F
    import model as M
    real, calls = F.conv1d, {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(F, "conv1d", counting)
    monkeypatch.setattr(bench, "HF_BATCH", {"tiny": (2, 0.5, 1.0), "base": (1, 0.5, 0.6)})
    seen = []

    def once(fns, reps):
        for f in fns:
            calls["n"] = 0
            f()
            seen.append(calls["n"])
        return [1.0] * len(fns)
    monkeypatch.setattr(bench, "_time_interleaved", once)
    bench.bench_feature_conv(bench.BenchConfig())
    assert seen[0] >= 7 and seen[2] >= 7 and seen[1] == seen[3] == 0 and M.CPU_MATMUL_CONV is True
    assert M.CPU_PER_UTTERANCE_CONV is True


def test_the_linear_peer_is_torchs_and_ours_goes_through_onednn(monkeypatch):
    """--only linear: the peer calls F.linear and never oneDNN's linear op; ours calls that op in every case."""
    import torch.nn.functional as F
    import model as M
    real_mm, real_f, seen, calls = M._onednn_mm, F.linear, [], {"op": 0, "f": 0}

    def counting(real, key):
        def f(*a, **k):
            calls[key] += 1
            return real(*a, **k)
        return f
    monkeypatch.setattr(M, "_onednn_mm", counting(real_mm, "op"))
    monkeypatch.setattr(F, "linear", counting(real_f, "f"))

    def once(fns, reps):
        for f in fns:
            calls.update(op=0, f=0)
            f()
            seen.append(dict(calls))
        return [1.0] * len(fns)
    monkeypatch.setattr(bench, "_time_interleaved", once)
    bench.bench_linear(bench.BenchConfig())
    assert len(seen) == 8
    assert all(p["f"] >= 1 and p["op"] == 0 for p in seen[::2]) and all(o["op"] >= 1 for o in seen[1::2])


def test_flops_of_onednn_products_are_counted():
    """torch's FLOP counter has no formula for oneDNN's linear op: bench._count_flops still counts model.linear's
    products (fp32 with gradients, and without: the packed path), 2 M K N each, and leaves the flag as it was."""
    import torch
    import model as M
    x, w = torch.randn(30, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    assert bench._count_flops(lambda: M.linear(x, w).sum().backward()) == 3 * 2 * 30 * 16 * 8
    with torch.no_grad():
        assert bench._count_flops(lambda: M.linear(x, w)) == 2 * 30 * 16 * 8
    assert M.CPU_ONEDNN_LINEAR is True
