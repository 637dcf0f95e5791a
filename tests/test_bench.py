"""bench.py's rows stay runnable: a smoke run of each row at small shapes with one repetition (no timing is
asserted), and the properties a comparison rests on (the peer really differs, the FLOPs are counted)."""
import math

import pytest
import torch

import bench


def _finite(rows):
    return rows and all(t > 0 and math.isfinite(t) and r > 0 and math.isfinite(r) for _, t, r in rows)


def test_decode_sinkhorn_and_wav2vec2_rows_run(capsys):
    """Small shapes: the KV-cache row (which asserts that both searches write the same tokens), Sinkhorn
    against POT, and wav2vec2 base against Hugging Face's on half a second of audio."""
    cfg = bench.BenchConfig()
    rows = bench.bench_decode(cfg, batch=2, length=5, reps=1)
    assert _finite(rows) and len(rows) == 2 and rows[1][2] == 1.0
    rows = bench.bench_sinkhorn(cfg, n=256, k=32, reps=1)
    assert _finite(rows) and len(rows) == 6 and rows[2][2] == 1.0
    rows = bench.bench_wav2vec2(cfg, seconds=0.5, batch=1, reps=1)
    assert _finite(rows) and len(rows) == 2 and rows[1][2] == 1.0
    out = capsys.readouterr().out
    assert "KV cache" in out and "POT" in out and "HF Wav2Vec2Model" in out


def test_train_step_and_precision_rows_run(capsys, monkeypatch):
    cfg = bench.BenchConfig()
    rows = bench.bench_train_step(cfg, reps=1)
    assert _finite(rows) and len(rows) == 4 and rows[0][2] == 1.0
    monkeypatch.setattr(bench, "HF_BATCH", {**bench.HF_BATCH, "base": (1, 0.5, 1.0)})    # base: one short utterance
    rows = bench.bench_precision(cfg, reps=1)
    assert _finite(rows) and len(rows) == 4 and rows[0][2] == rows[2][2] == 1.0
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


def test_the_activation_dropout_peer_really_drops(monkeypatch):
    """The 'FFN activation dropout 0.1' peer trains with dropout 0.1 inside every FFN; the main job's step
    (the default) with none there."""
    import model as M
    seen = set()
    real = M.FeedForward.forward

    def spy(self, x):
        seen.add((self.training, self.activation_dropout.p))
        return real(self, x)
    monkeypatch.setattr(M.FeedForward, "forward", spy)
    for over, p in (({}, 0.0), ({"activation_dropout": 0.1}, 0.1)):
        seen.clear()
        bench._tiny_step(bf16=False, **over)()
        assert seen == {(True, p)}


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
    assert [name.split(":")[0] for name, _, _ in rows] == ["tiny fp32"] * 3 + ["tiny bf16"] * 3
    rows = bench.bench_generate(cfg, length=4, reps=1, presets=("tiny",))
    assert _finite(rows) and len(rows) == 8 and all("4 tokens" in name for name, _, _ in rows if "alone" not in name)
    assert rows[2][2] < rows[1][2] and rows[6][2] < rows[5][2]   # the encoder alone: less than the search it starts
    assert [name.split(":")[0] for name, _, _ in rows] == ["tiny fp32"] * 4 + ["tiny bf16"] * 4
    rows = bench.bench_mfu(cfg, reps=1, presets=("tiny",))
    assert len(rows) == 1 and rows[0][1] > 0 and 0 < rows[0][2] < 1.5
    out = capsys.readouterr().out
    assert "against Hugging Face" in out and "model FLOP utilisation" in out


def test_flops_of_a_linear_layer_are_counted():
    """bench._count_flops (torch.utils.flop_counter) counts a plain nn.Linear's products: 2 M K N forward,
    and twice that again backward (the input's and the weight's gradients)."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(16, 8), torch.randn(30, 16, requires_grad=True)
    assert bench._count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 30 * 16 * 8
    with torch.no_grad():
        assert bench._count_flops(lambda: layer(x)) == 2 * 30 * 16 * 8


def test_the_matmul_peak_is_positive_and_finite():
    for bf16 in (False, True):
        peak = bench._matmul_peak(bf16, n=256, reps=1)
        assert 0 < peak < math.inf


def test_bf16_rows_only_where_the_gpu_runs_it_natively(monkeypatch):
    """On a CPU both precisions run; on a GPU without native bf16 only fp32 (and train_step/mfu take fp32)."""
    assert bench._precisions() == (False, True)
    monkeypatch.setattr(bench, "DEVICE", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert bench._precisions() == (False,) and bench._train_bf16() is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert bench._precisions() == (False, True) and bench._train_bf16() is True


def test_only_runs_one_row_and_rejects_removed_ones(monkeypatch):
    """--only ROW runs that row alone; a row that no longer exists (--only linear) is an error, not a silent
    no-op; on a GPU, a CPU row is refused and a GPU row runs."""
    ran = []
    monkeypatch.setattr(bench, "DEVICE", bench.DEVICE)           # main() sets it: restored afterwards
    monkeypatch.setattr(bench, "BENCHES", {name: (lambda cfg, name=name: ran.append((name, cfg.device)))
                                           for name in bench.BENCHES})
    for argv, expect in ((["--only=sinkhorn"], [("sinkhorn", "cpu")]),
                         (["--only=hf_step", "--device=cuda"], [("hf_step", "cuda")]),
                         ([], [(name, "cpu") for name in bench.BENCHES]),
                         (["--device=cuda"], [(name, "cuda") for name in bench.GPU_ROWS])):
        ran.clear()
        monkeypatch.setattr("sys.argv", ["bench.py", *argv])
        bench.main()
        assert ran == expect, argv
    for argv in (["--only=linear"], ["--only=attention"], ["--only=precision", "--device=cuda"]):
        monkeypatch.setattr("sys.argv", ["bench.py", *argv])
        with pytest.raises(SystemExit):
            bench.main()
