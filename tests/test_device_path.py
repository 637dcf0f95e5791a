"""The path a GPU runs, run on a CPU: no tensor made without a device, DDP with the wav2vec2 front end,
torchrun through both stages, a non-finite loss on one rank only, and the host synchronisations of a step.

A GPU runs the same code as these tests (model.py has no device branch), so what can break there only
through the device is a tensor created on the wrong one, or a rank that waits for another. The first test
makes the default device `meta`: every tensor created without naming a device then lands on a device that
holds no data, and the first operation that meets a CPU tensor fails loudly, as it would on a GPU.
"""
import collections
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data
import evaluate
import model as M
import train

ROOT = Path(__file__).resolve().parents[1]


def config(corpus, out_dir, recipe="xstnet", **over) -> train.TrainConfig:
    """A few-second run (tiny preset, log-mel, small batches, no evaluation in the loop) of `recipe`."""
    base = dict(data=str(corpus), out_dir=str(out_dir), vocab_size=200, max_steps=4, batch_seconds=15.0, workers=0,
                log_every=1000, eval_every=10**9, warmup=5, bf16="false", threads=1, seed=5, save_minutes=1000.0)
    return train.config(recipe=recipe, **{**base, **over})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# every tensor on the device of the tensors it meets
# ------------------------------------------------------------------------------------------------
RECIPES = {"const, every view, wav2vec2": dict(frontend="wav2vec2", recipe="const", ctr_views="original+rep+sma+scut+fcut"),
           "s+h, CTC mix-up and text noise": dict(recipe="s+h", adv_mixup="ctc", adv_mixup_prob=1.0, adv_mixup_start=0.0),
           "sspc+const": dict(recipe="sspc+const", sspc_queue=8)}


@pytest.mark.parametrize("name", RECIPES)
def test_a_step_a_search_and_an_evaluation_create_no_tensor_without_a_device(tiny_corpus, name):
    """Model, aligners, optimiser and batch are explicit CPU tensors; inside, the default device is `meta`.
    A training step (forward, every term, backward, clipping, a fused Adam step), beam and greedy search,
    and evaluate's decoding and retrieval must then run as on a CPU; any tensor made without a device
    would be a meta tensor and fail the first operation that meets real data."""
    cfg = config(tiny_corpus, "unused", **RECIPES[name])
    vocab = data.build_vocab(tiny_corpus, cfg.vocab_size, verbose=False)
    ds = data.MustcSplit(tiny_corpus, "train", vocab, verbose=False)
    batch = data.collate([ds[i] for i in range(6)])
    torch.manual_seed(0)
    model = M.SpeechTranslator(train.model_config(cfg, len(vocab)))
    aux, tables = train.build_aligners(cfg, model.cfg.d_model), train.text_tables(vocab)
    params = [*model.parameters(), *aux.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-4, fused=True)
    tasks = ("st", "asr", "mt")
    if "sspc" in aux:                             # fill the queues first: SSPC's targets then run too
        for q in (*aux["sspc"].queue_in.values(), *aux["sspc"].queue_j.values()):
            q.pushed.fill_(len(q.rows))
    test = data.MustcSplit(tiny_corpus, "tst-COMMON", vocab, verbose=False)
    with torch.device("meta"):
        assert torch.empty(1).device.type == "meta"          # the trap is set
        loss, terms = train.objective(cfg, model, batch, tasks, step=cfg.max_steps // 2, aux=aux, tables=tables)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        logged = train.logged_floats([terms], torch.device("cpu"))[0]
        model.eval()
        enc = model.encode(*model.encode_speech(batch.audio[:2], batch.audio_lens[:2]))
        lang = vocab.lang_id("de")
        beams = model.generate(enc, batch.audio_lens.new_tensor([enc.shape[1]] * 2), lang, beam=3, max_len_b=5)
        greedy = model.greedy(enc, batch.audio_lens.new_tensor([enc.shape[1]] * 2), lang, max_len_b=5)
        hyps = evaluate.decode(model, test, vocab, "st", beam=2, indices=[0, 1])
        found = evaluate.retrieval(model, test)
    assert loss.device.type == "cpu" and torch.isfinite(loss)
    assert all(p.grad is None or p.grad.device.type == "cpu" for p in params)
    assert set(tasks) <= set(logged) and all(isinstance(v, float) for v in logged.values())
    assert len(beams) == len(greedy) == 2 and len(hyps) == 2 and set(found) == {"low", "high"}
    if "adv" in cfg.recipe or cfg.adv_weight:
        assert logged["mixed"] == 1.0 and "adv_d" in logged      # the mix-up ran
    if "sspc" in aux:
        assert logged["sspc_on"] == 1.0


# ------------------------------------------------------------------------------------------------
# DDP: two gloo processes
# ------------------------------------------------------------------------------------------------
def _worker(rank, world, port, cfg_dict, out, w2v, nan_on_rank):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if w2v:      # LayerDrop on, the feature encoder frozen (fairseq's feature_grad_mult 0): unused parameters
        real_config = train.model_config

        def model_config(cfg, vocab_size):
            mcfg = real_config(cfg, vocab_size)
            mcfg.w2v.layerdrop, mcfg.w2v.feature_grad_mult = 0.5, 0.0
            return mcfg
        train.model_config = model_config
    built = []
    real_to = M.SpeechTranslator.to
    M.SpeechTranslator.to = lambda self, *a, **k: built.append(self) or real_to(self, *a, **k)
    if nan_on_rank == rank:      # this rank alone meets a non-finite loss in its second forward pass
        real_objective, calls = train.objective, []

        def objective(*a, **k):
            calls.append(1)
            loss, terms = real_objective(*a, **k)
            return (loss * float("nan"), terms) if len(calls) == 2 else (loss, terms)
        train.objective = objective
    result = train.train(train.TrainConfig(**cfg_dict))
    torch.distributed.destroy_process_group()
    torch.save({"state": built[0].state_dict(), "step": result["step"], "skipped": result["skipped"],
                "history": result["history"]}, f"{out}.{rank}.pt")


def _spawn(cfg, out, w2v=False, nan_on_rank=-1) -> list:
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), cfg.__dict__, str(out), w2v, nan_on_rank), nprocs=2)
    return [torch.load(f"{out}.{r}.pt") for r in range(2)]


def test_ddp_with_wav2vec2_layerdrop_and_a_frozen_feature_encoder(tiny_corpus, tmp_path):
    """wav2vec2 leaves parameters without a gradient (masked_spec_embed always, LayerDrop's skipped layers,
    the frozen feature encoder): DDP must find them, or its second step stops with "Expected to have
    finished reduction". Two ranks train in step: the same weights on both, the frozen convolutions as
    they started, the Transformer layers moved."""
    cfg = config(tiny_corpus, tmp_path / "run", frontend="wav2vec2", max_steps=3, accum=2)
    ranks = _spawn(cfg, tmp_path / "w", w2v=True)
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert [k for k in a if not torch.allclose(a[k], b[k], atol=1e-6)] == []
    torch.manual_seed(cfg.seed)        # rank 0's initial weights (train seeds seed + rank)
    vocab = data.build_vocab(tiny_corpus, cfg.vocab_size, verbose=False)
    start = M.SpeechTranslator(train.model_config(cfg, len(vocab))).state_dict()
    conv = "wav2vec2.feature_extractor.conv_layers.1.conv.weight"
    layer = "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight"
    assert torch.equal(a[conv], start[conv]) and not torch.equal(a[layer], start[layer])


def test_a_non_finite_loss_on_one_rank_skips_the_update_on_both(tiny_corpus, tmp_path):
    """Rank 1 alone meets a NaN loss: both ranks skip that update (DDP averages the NaN gradient into
    both), count one skip, end at the same step with the same, finite weights."""
    ranks = _spawn(config(tiny_corpus, tmp_path / "run", max_steps=3), tmp_path / "n", nan_on_rank=1)
    assert [r["skipped"] for r in ranks] == [1, 1] and [r["step"] for r in ranks] == [3, 3]
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())
    assert [k for k in a if not torch.allclose(a[k], b[k], atol=1e-6)] == []


def test_torchrun_runs_both_stages_and_rank_0_alone_evaluates(tiny_corpus, tmp_path):
    """`torchrun --nproc_per_node=2 train.py`: the MT stage, then the multitask stage from its last.pt (which
    the other rank reads only after rank 0 wrote it), then one evaluation and one results table."""
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(ROOT / "train.py"), f"--data={tiny_corpus}", f"--out_dir={out}", "--vocab_size=200", "--mt_steps=3",
           "--max_steps=3", "--batch_seconds=15", "--workers=0", "--threads=1", "--bf16=false", "--warmup=2",
           "--mt_warmup=2", "--log_every=1000"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert M.load_checkpoint(out / "mt" / "last.pt")["step"] == 3 and M.load_checkpoint(out / "last.pt")["step"] == 3
    assert run.stdout.count("results on tst-COMMON") == 1 and "ST BLEU" in run.stdout
    summary = json.loads((out / "eval_tst-COMMON.json").read_text())
    assert summary["n"] == 8 and "st_bleu" in summary


# ------------------------------------------------------------------------------------------------
# host synchronisations
# ------------------------------------------------------------------------------------------------
class ScalarReads(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: a tensor read as a Python number
    (item, bool, float, int: aten._local_scalar_dense), and outputs whose size depends on values."""
    WAITS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.WAITS:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recipe", ["const", "xstnet", "sspc"])
def test_a_training_step_waits_for_the_device_at_most_twice(tiny_corpus, tmp_path, monkeypatch, recipe):
    """The main job's recipe and the other plain ones: per step one read decides whether the update is
    finite, one counts the target tokens on the host (a CPU tensor on a GPU too, before the copy); logged
    values stay on the device until log_every. Measured as the difference between 6 and 2 steps, so the
    set-up and the final log are not counted."""
    tolist = torch.Tensor.tolist
    reads = collections.Counter()
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.update(["tolist"]) or tolist(self))

    def count(steps):
        reads.clear()
        with ScalarReads() as mode:
            train.train(config(tiny_corpus, tmp_path / f"{steps}", recipe, max_steps=steps))
        return mode.counts + reads
    few, many = count(2), count(6)
    per_step = {k: (many[k] - few[k]) / 4 for k in many | few}
    assert sum(per_step.values()) <= 2, per_step


# ------------------------------------------------------------------------------------------------
# precision: bf16 where a GPU runs it natively, else fp16 with loss scaling
# ------------------------------------------------------------------------------------------------
def test_precision_takes_bf16_only_on_gpus_that_run_it_and_fp16_with_a_scaler_elsewhere(tiny_corpus, tmp_path,
                                                                                        monkeypatch):
    cfg, cuda = config(tiny_corpus, tmp_path, bf16="auto"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert train.precision(cfg, cuda)[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert train.precision(cfg, cuda)[0] == torch.float16                      # a V100 or T4: emulated bf16 only
    assert train.precision(config(tiny_corpus, tmp_path, bf16="true"), cuda)[0] == torch.bfloat16   # asked for
    assert train.precision(config(tiny_corpus, tmp_path, bf16="false"), cuda)[0] is None


def test_fp16_with_loss_scaling_trains_skips_an_overflow_and_resumes_exactly(tiny_corpus, tmp_path, monkeypatch):
    """The fp16 path (GradScaler) on a CPU: an overflowing step is skipped and lowers the scale, the scale is
    saved with the checkpoint, and a resumed run continues exactly."""
    monkeypatch.setattr(train, "precision", lambda cfg, device: (torch.float16, "test"))
    real, calls = train.objective, []

    def overflow_once(*a, **k):
        calls.append(1)
        loss, terms = real(*a, **k)
        return (loss * float("inf"), terms) if len(calls) == 2 else (loss, terms)
    monkeypatch.setattr(train, "objective", overflow_once)
    whole = train.train(config(tiny_corpus, tmp_path / "a", max_steps=4))
    scale = M.load_checkpoint(tmp_path / "a" / "last.pt")["scaler"]["scale"]
    assert whole["skipped"] == 1 and whole["step"] == 4 and scale == 2.0 ** 16 / 2     # halved once, not grown yet
    calls.clear()
    first = train.train(config(tiny_corpus, tmp_path / "b", max_steps=2))
    second = train.train(config(tiny_corpus, tmp_path / "b", max_steps=4, resume=True))
    assert first["history"] + second["history"] == whole["history"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (.ci/gpu_check runs it)")
def test_on_cuda_a_short_run_trains_decodes_and_evaluates(tiny_corpus, tmp_path):
    """The main job's recipe for a few steps on the GPU in its precision, then the final evaluation."""
    result = train.train(config(tiny_corpus, tmp_path, "const", device="cuda", bf16="auto", max_steps=6))
    assert result["step"] == 6 and result["skipped"] == 0
    summary = evaluate.main(["--ckpt", result["last"], "--beam", "3", "--quiet", "--no_plots"])
    assert {"st_bleu", "mt_bleu", "asr_wer", "retrieval"} <= set(summary)
