"""bench.py's rows stay runnable: a smoke run of each new row with one repetition (no timing is asserted)."""
import math

import bench


def _finite(rows):
    return rows and all(t > 0 and math.isfinite(t) and r > 0 and math.isfinite(r) for _, t, r in rows)


def test_attention_train_step_and_precision_rows_run(capsys):
    cfg = bench.BenchConfig()
    assert _finite(bench.bench_attention(cfg, reps=1))
    rows = bench.bench_train_step(cfg, reps=1)
    assert _finite(rows) and len(rows) == 6 and rows[0][2] == 1.0
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
