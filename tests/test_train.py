"""Tests of train.py: a loss that falls, exact resume, DDP equality, non-finite skips, config errors, atomic saves."""
import json
import math
import os
import socket

import pytest
import torch

import train


def config(corpus, out_dir, **over) -> train.TrainConfig:
    """A few-second run: tiny preset, log-mel, small batches, no evaluation in the loop."""
    base = dict(data=str(corpus), out_dir=str(out_dir), vocab_size=200, max_steps=6, batch_seconds=15.0, workers=0,
                log_every=1000, eval_every=10**9, warmup=5, bf16="false", threads=1, seed=5)
    return train.TrainConfig(**{**base, **over})


def test_loss_falls(tiny_corpus, tmp_path):
    result = train.train(config(tiny_corpus, tmp_path, max_steps=40, lr=3e-3, dropout=0.0, batch_seconds=30.0))
    st = [h["st"] for h in result["history"]]
    ctc = [h["ctc"] for h in result["history"]]
    assert sum(st[-5:]) / 5 < 0.8 * sum(st[:5]) / 5
    assert sum(ctc[-5:]) / 5 < 0.8 * sum(ctc[:5]) / 5
    ckpt = train.load_checkpoint(tmp_path / "last.pt")         # weights_only=True loads it
    assert ckpt["step"] == 40 and ckpt["config"]["lr"] == 3e-3 and ckpt["sampler"]["seed"] == 5


def test_resume_is_exact(tiny_corpus, tmp_path):
    """2N steps in one run equal N steps + resume + N steps, bitwise, dropout on."""
    whole = train.train(config(tiny_corpus, tmp_path / "a", max_steps=8))
    first = train.train(config(tiny_corpus, tmp_path / "b", max_steps=4))
    second = train.train(config(tiny_corpus, tmp_path / "b", max_steps=8, resume=True))
    assert first["history"] + second["history"] == whole["history"]
    a, b = torch.load(tmp_path / "a" / "last.pt"), torch.load(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dict, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = train.train(train.TrainConfig(**cfg_dict))
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result["history"], f)


def test_ddp_equals_one_process_with_the_same_global_batch(tiny_corpus, tmp_path):
    """2 gloo processes x 1 batch each == 1 process x 2 accumulated batches: same losses (<= 1e-5)."""
    single = train.train(config(tiny_corpus, tmp_path / "one", max_steps=3, accum=2, dropout=0.0))
    cfg = config(tiny_corpus, tmp_path / "two", max_steps=3, accum=1, dropout=0.0)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), cfg.__dict__, str(tmp_path / "hist")), nprocs=2)
    ranks = [json.load(open(tmp_path / f"hist.{r}.json")) for r in range(2)]
    for step, one in enumerate(single["history"]):
        for term in one:
            ddp = (ranks[0][step][term] + ranks[1][step][term]) / 2
            assert abs(ddp - one[term]) <= 1e-5, (step, term, ddp, one[term])


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_corpus, tmp_path, monkeypatch):
    real, calls = train.objective, {"n": 0}

    def sometimes_nan(*args):
        calls["n"] += 1
        loss, terms = real(*args)
        return (loss * float("nan"), terms) if calls["n"] in (2, 3) else (loss, terms)
    monkeypatch.setattr(train, "objective", sometimes_nan)
    result = train.train(config(tiny_corpus, tmp_path / "a", max_steps=4))
    assert result["skipped"] == 2 and result["step"] == 4
    assert all(math.isfinite(h["st"]) for h in result["history"])
    monkeypatch.setattr(train, "objective", lambda *a: (real(*a)[0] * float("inf"), {}))
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        train.train(config(tiny_corpus, tmp_path / "b", max_steps=4, max_bad_steps=3))


def test_config_overrides_are_type_checked():
    cfg = train.parse_config(["--max_steps=12", "--lr=0.5", "--resume", "--recipe=xstnet", "--data=x"])
    assert (cfg.max_steps, cfg.lr, cfg.resume, cfg.data) == (12, 0.5, True, "x")
    assert train.parse_config(["--preset=base"]).warmup == 25_000
    with pytest.raises(SystemExit, match="unknown config key 'max_step'; did you mean max_steps"):
        train.parse_config(["--max_step=5"])
    with pytest.raises(SystemExit, match="--max_steps expects a int, got 'many'"):
        train.parse_config(["--max_steps=many"])
    with pytest.raises(SystemExit, match="--resume expects a bool"):
        train.parse_config(["--resume=maybe"])
    with pytest.raises(SystemExit, match="unknown recipe"):
        train.parse_config(["--recipe=magic"])


def test_const_recipe_adds_the_contrastive_term(tiny_corpus, tmp_path):
    cfg = train.parse_config(["--recipe=const"])
    assert (cfg.ctr_weight, cfg.ctr_tau) == (1.5, 0.02)
    result = train.train(config(tiny_corpus, tmp_path, max_steps=2, ctr_weight=1.5, ctr_tau=0.02))
    assert all(set(h) == {"st", "asr", "mt", "ctc", "ctr"} for h in result["history"])
    assert all(h["ctr"] >= 0 for h in result["history"]) and sum(h["ctr"] for h in result["history"]) > 0  # 0 for B=1


def test_inverse_sqrt_schedule():
    assert train.inverse_sqrt(50, 100) == 0.5 and train.inverse_sqrt(100, 100) == 1.0
    assert train.inverse_sqrt(400, 100) == 0.5


def test_checkpoints_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    train.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "step": 1})
    real_save = torch.save

    def crash(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoi")
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["step"] == 1          # the old checkpoint is intact
    with pytest.raises(KeyError, match="no 'config'"):
        train.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.load_checkpoint(tmp_path / "none.pt")


def test_mt_stage_then_init_from(tiny_corpus, tmp_path):
    mt = train.train(config(tiny_corpus, tmp_path / "mt", stage="mt", max_steps=3, batch_tokens=400))
    assert all(set(h) == {"mt"} for h in mt["history"])
    ckpt = train.load_checkpoint(mt["last"])
    start = train.train(config(tiny_corpus, tmp_path / "start", max_steps=0, init_from=mt["last"]))
    started = train.load_checkpoint(start["last"])["model"]
    assert all(torch.equal(started[k], v) for k, v in ckpt["model"].items())       # begins where MT ended
    multi = train.train(config(tiny_corpus, tmp_path / "multi", max_steps=1, init_from=mt["last"]))
    assert set(multi["history"][0]) == {"st", "asr", "mt", "ctc"}
    with pytest.raises(FileNotFoundError):
        train.train(config(tiny_corpus, tmp_path / "x", init_from=str(tmp_path / "missing.pt")))
