"""Tests of train.py: a loss that falls, exact resume, DDP equality, non-finite skips, config errors, atomic saves."""
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import losses
import model as M
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
    ckpt = M.load_checkpoint(tmp_path / "last.pt")         # weights_only=True loads it
    assert ckpt["step"] == 40 and ckpt["config"]["lr"] == 3e-3 and ckpt["sampler"]["seed"] == 5
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # throughput: target tokens per second, between 4 and 60 tokens per utterance on the tiny corpus
    rates = [r for r in log if "utt_per_s" in r]
    assert rates and all(4 * r["utt_per_s"] < r["tok_per_s"] < 60 * r["utt_per_s"] for r in rates)


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


def test_ddp_averages_the_aligners_gradients(tiny_corpus, tmp_path):
    """The discriminator lives outside DDP; its gradients are averaged by hand. Without that the two
    ranks' discriminators drift apart and the later steps' adversarial losses differ from one process."""
    over = dict(max_steps=4, dropout=0.0, adv_weight=4.0, adv_mixup="none", adv_text_noise=False, adv_gen_warmup=0.0)
    single = train.train(config(tiny_corpus, tmp_path / "one", accum=2, **over))
    cfg = config(tiny_corpus, tmp_path / "two", accum=1, **over)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), cfg.__dict__, str(tmp_path / "hist")), nprocs=2)
    ranks = [json.load(open(tmp_path / f"hist.{r}.json")) for r in range(2)]
    for step, one in enumerate(single["history"]):
        for term in ("st", "adv_d", "adv_g"):
            ddp = (ranks[0][step][term] + ranks[1][step][term]) / 2
            assert abs(ddp - one[term]) <= 1e-5, (step, term, ddp, one[term])
    a, b = (torch.load(tmp_path / "two" / "last.pt")["aligners"], torch.load(tmp_path / "one" / "last.pt")["aligners"])
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


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
    assert train.parse_config(["--preset=base", "--w2v_path=none"]).warmup == 25_000
    with pytest.raises(SystemExit, match="unknown config key 'max_step'; did you mean max_steps"):
        train.parse_config(["--max_step=5"])
    with pytest.raises(SystemExit, match="--max_steps expects a int, got 'many'"):
        train.parse_config(["--max_steps=many"])
    with pytest.raises(SystemExit, match="--resume expects a bool"):
        train.parse_config(["--resume=maybe"])
    with pytest.raises(SystemExit, match="unknown recipe"):
        train.parse_config(["--recipe=magic"])


def test_help_lists_every_setting_with_its_default_and_exits_0(capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_config(["--lr=1", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for f in train.dataclasses.fields(train.TrainConfig):
        assert f"--{f.name}=" in text, f.name
    assert "--ctr_tau=0.02 " in text and "its temperature" in text and "\noptimisation\n" in text


def test_config_from_python_applies_preset_and_recipe():
    """train.config is the command line's composition; a TrainConfig naming a recipe or preset whose
    settings were never applied is refused, so a log never says `s-align` over a run without its adversary."""
    cfg = train.config(preset="base", recipe="s-align", lr=3e-4, w2v_path="none")
    assert cfg == train.parse_config(["--preset=base", "--recipe=s-align", "--lr=0.0003", "--w2v_path=none"])
    assert (cfg.adv_weight, cfg.warmup, cfg.frontend, cfg.lr) == (4.0, 25_000, "wav2vec2", 3e-4)
    assert train.config() == train.parse_config([]) and train.config().ctr_weight == 1.5   # const, as on the command line
    with pytest.raises(SystemExit, match="recipe='s-align', but none of its settings is applied .*adv_weight=4.0"):
        train.check_config(train.TrainConfig(recipe="s-align"))
    with pytest.raises(SystemExit, match="preset='base', but none of its settings"):
        train.check_config(train.TrainConfig(preset="base"))
    with pytest.raises(SystemExit, match="unknown recipe 'magic'"):
        train.check_config(train.TrainConfig(recipe="magic"))
    with pytest.raises(SystemExit, match="unknown config key 'max_step'; did you mean max_steps"):
        train.config(max_step=3)
    train.check_config(train.TrainConfig(recipe="const", ctr_weight=0.5))     # an ablation of a recipe: allowed
    train.check_config(train.TrainConfig(recipe="xstnet"))                      # nothing to apply


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
    with pytest.raises(data.UserError, match="no 'config'"):
        M.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load_checkpoint(tmp_path / "none.pt")


def test_mt_stage_then_init_from(tiny_corpus, tmp_path):
    mt = train.train(config(tiny_corpus, tmp_path / "mt", stage="mt", max_steps=3, batch_tokens=400))
    assert all(set(h) == {"mt"} for h in mt["history"])
    ckpt = M.load_checkpoint(mt["last"])
    start = train.train(config(tiny_corpus, tmp_path / "start", max_steps=0, init_from=mt["last"]))
    started = M.load_checkpoint(start["last"])["model"]
    assert all(torch.equal(started[k], v) for k, v in ckpt["model"].items())       # begins where MT ended
    multi = train.train(config(tiny_corpus, tmp_path / "multi", max_steps=1, init_from=mt["last"]))
    assert set(multi["history"][0]) == {"st", "asr", "mt", "ctc"}
    with pytest.raises(FileNotFoundError):
        train.train(config(tiny_corpus, tmp_path / "x", init_from=str(tmp_path / "missing.pt")))


def _model_and_batch(corpus, **over):
    import data
    cfg = config(corpus, "unused", dropout=0.0, **over)
    vocab = data.build_vocab(corpus, cfg.vocab_size, verbose=False)
    ds = data.MustcSplit(corpus, "train", vocab, verbose=False)
    batch = data.collate([ds[i] for i in range(6)])
    torch.manual_seed(0)
    return cfg, M.SpeechTranslator(train.model_config(cfg, len(vocab))), batch, vocab


def test_ctc_head_reads_the_length_adaptor_output_without_positions(tiny_corpus):
    """ConST's ctc_cnn (the released compute_ctc_logit_and_logprob): sqrt(d) x the length adaptor's output,
    its own dropout, no positional embeddings; the encoder's input is the same states plus positions."""
    cfg, model, batch, _ = _model_and_batch(tiny_corpus)
    model.eval()
    with torch.no_grad():
        out = model(batch, ("st",))
        T = out.speech_low.shape[1]
        assert torch.allclose(out.speech_low, out.speech_subsampled * model.embed_scale + model.positions[:T], atol=1e-5)
        _, logged = train.objective(cfg, model, batch, ("st",))
        n = batch.tgt_lens.sum().item()
        head = losses.ctc_loss(model.ctc_states(out.speech_subsampled), out.speech_lens, model.embed_tokens.weight,
                               batch.src, batch.src_lens) / n
        with_positions = losses.ctc_loss(out.speech_low, out.speech_lens, model.embed_tokens.weight, batch.src,
                                         batch.src_lens) / n
    assert logged["ctc"] == pytest.approx(head.item(), rel=1e-5)
    assert abs(with_positions.item() - head.item()) > 1e-3 * head.item()


def test_config_weights_ctr_by_target_language_and_rejects_impossible_values():
    """ConST §4.1: lambda 1.5 for German and Dutch, 1.0 for the other MuST-C targets; a value given wins."""
    assert train.config(recipe="const", data="must-c/en-de").ctr_weight == 1.5
    assert train.config(recipe="sspc+const", data="must-c/en-nl").ctr_weight == 1.5
    assert train.config(recipe="const", data="must-c/en-fr").ctr_weight == 1.0
    assert train.parse_config(["--data=must-c/en-es"]).ctr_weight == 1.0
    assert train.config(recipe="const", data="must-c/en-fr", ctr_weight=2.0).ctr_weight == 2.0
    with pytest.raises(SystemExit, match="--adv_d_extra=0.0"):
        train.config(recipe="s-align", adv_d_extra=0.0)
    with pytest.raises(SystemExit, match="--sspc_r=65"):
        train.config(recipe="sspc", sspc_r=65)


def test_lambda_zero_is_xstnet_and_each_term_enters_with_its_weight(tiny_corpus):
    """ConST with lambda 0 = XSTNet (docs/methods.md, "Objective: ConST Eq. 1"); with lambda > 0 the
    loss grows by exactly lambda * L_CTR / N_tgt, and likewise for L2 and H-Align."""
    cfg, model, batch, _ = _model_and_batch(tiny_corpus)
    tasks = ("st", "asr", "mt")
    base, terms = train.objective(cfg, model, batch, tasks)
    zero, _ = train.objective(train.dataclasses.replace(cfg, ctr_weight=0.0, ctr_tau=0.05), model, batch, tasks)
    assert torch.equal(base, zero) and set(terms) == {"st", "asr", "mt", "ctc"}
    n = batch.tgt_lens.sum().item()
    for key, over in (("ctr", dict(ctr_weight=1.5)), ("l2", dict(l2_weight=0.7)), ("halign", dict(halign_weight=0.45))):
        loss, terms = train.objective(train.dataclasses.replace(cfg, **over), model, batch, tasks)
        weight = next(iter(over.values()))
        if key == "halign":      # the S-Align code's weight against its 0.7-weighted ST cross-entropy
            weight /= losses.SALIGN_ST_CE_WEIGHT
        assert terms[key] > 0 and abs(loss.item() - base.item() - weight * terms[key]) < 1e-4 * (1 + loss.item()), key


def test_contrastive_views_every_combination(tiny_corpus):
    """Any of the 31 non-empty subsets of Original/Rep/SMA/SCut/FCut is one N-pair term per view;
    the original view is Eq. 4 on the pooled low-level states."""
    import itertools
    import losses
    cfg, model, batch, _ = _model_and_batch(tiny_corpus)
    out = model(batch, ("st",))
    combos = [c for k in range(1, 6) for c in itertools.combinations(train.CTR_VIEWS, k)]
    assert len(combos) == 31
    for combo in combos:
        c = train.dataclasses.replace(cfg, ctr_views="+".join(combo))
        train.check_config(c)
        pairs = train.contrastive_views(c, model, batch, out)
        assert tuple(pairs) == combo
    pairs = train.contrastive_views(train.dataclasses.replace(cfg, ctr_views="original+scut+rep"), model, batch, out)
    u = M.masked_mean(out.speech_low, out.speech_lens)
    v = M.masked_mean(model.encode_text(batch.src, batch.src_lens)[0], batch.src_lens)
    assert torch.allclose(pairs["original"][0], u) and torch.allclose(pairs["original"][1], v, atol=1e-6)
    assert not torch.allclose(pairs["scut"][0], u) and torch.allclose(pairs["scut"][1], v, atol=1e-6)
    assert torch.allclose(pairs["rep"][0], u) and not torch.allclose(pairs["rep"][1], v)
    loss, terms = train.objective(train.dataclasses.replace(cfg, ctr_weight=1.0, ctr_views="original+fcut"), model, batch,
                                  ("st",))
    assert terms["ctr"] > 0
    for bad in ("orignal", "original+original", "scut+"):
        with pytest.raises(SystemExit, match="ctr_views"):
            train.check_config(train.dataclasses.replace(cfg, ctr_views=bad))


def test_recipes_set_the_papers_values():
    r = {name: train.parse_config([f"--recipe={name}"]) for name in train.RECIPES}
    st_only = r["st-only"]
    assert (st_only.st_weight, st_only.asr_weight, st_only.mt_weight, st_only.ctc_weight) == (1, 0, 0, 0)
    assert (r["const"].ctr_weight, r["const"].ctr_tau) == (1.5, 0.02)
    assert (r["h-align"].halign_weight, r["h-align"].halign_tau, r["h-align"].adv_weight) == (0.45, 0.1, 0.0)
    assert (r["s-align"].adv_weight, r["s-align"].halign_weight) == (4.0, 0.0)
    assert (r["s+h"].adv_weight, r["s+h"].halign_weight) == (4.0, 0.45)
    assert r["sspc"].sspc_weight == 1.0 and r["sspc+const"].ctr_weight == 1.5
    assert all(r[name].__dict__[k] == 0 for name in ("xstnet", "st-only")
               for k in ("ctr_weight", "l2_weight", "halign_weight", "adv_weight", "sspc_weight"))
    with pytest.raises(SystemExit, match="adv_variant"):
        train.parse_config(["--adv_variant=minimax"])


def test_alignment_recipes_train_log_their_terms_and_resume_exactly(tiny_corpus, tmp_path, monkeypatch):
    """S-Align + H-Align + SSPC in one run: the discriminator and the anchors learn, the queue fills
    and switches SSPC on, the logs carry D's and G's losses separately, and a run killed after its
    step-4 checkpoint resumes (aligners, queues, schedule) to equal the uninterrupted one bitwise."""
    over = dict(adv_weight=4.0, halign_weight=0.45, sspc_weight=1.0, sspc_queue=24, adv_gen_warmup=0.1,
                adv_mixup_start=0.0, adv_mixup_prob=0.5, adv_noise_p=0.5, max_steps=8, eval_every=4, eval_dev_max=2)
    whole = train.train(config(tiny_corpus, tmp_path / "a", **over))
    real, calls = train.objective, {"n": 0}

    def killed_at_step_5(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(train, "objective", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.train(config(tiny_corpus, tmp_path / "b", **over))
    monkeypatch.setattr(train, "objective", real)
    at_4 = torch.load(tmp_path / "b" / "last.pt")
    assert at_4["step"] == 4
    second = train.train(config(tiny_corpus, tmp_path / "b", resume=True, **over))
    assert second["history"] == whole["history"][4:]
    a, b = torch.load(tmp_path / "a" / "last.pt"), torch.load(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a["aligners"][k], b["aligners"][k]) for k in a["aligners"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    h = whole["history"]
    assert {"adv_d", "adv_g", "disc_bce", "gen_bce", "disc_acc", "halign", "sspc", "sspc_intra", "sspc_cross",
            "anchor_entropy"} <= set(h[0])
    assert h[0]["adv_g"] > 0 and h[0]["sspc_on"] == 0 and h[0]["sspc"] == 0 and h[-1]["sspc_on"] == 1 and h[-1]["sspc"] > 0
    assert 0 < h[-1]["anchor_entropy"] <= math.log(64) + 1e-6
    for k in ("disc.fc1.weight", "disc.out_proj.weight", "sspc.anchors_in.s.weight", "sspc.anchors_j.x.weight"):
        assert not torch.equal(a["aligners"][k], at_4["aligners"][k]), k


def test_text_tables_find_punctuation_and_word_starts(tiny_corpus):
    import data
    vocab = data.build_vocab(tiny_corpus, 200, verbose=False)
    t = train.text_tables(vocab)
    punct = {vocab.sp.id_to_piece(i) for i in t["punctuation"].nonzero().flatten().tolist()}
    assert "." in {p.lstrip("\u2581") for p in punct} and not (t["punctuation"] & t["word_initial"]).any()
    starts = [vocab.sp.id_to_piece(i) for i in t["word_initial"].nonzero().flatten().tolist()]
    assert starts and all(p.startswith("\u2581") for p in starts)
    for special in (data.BOS_ID, data.PAD_ID, data.EOS_ID, *vocab.tags.values()):
        assert not t["punctuation"][special] and not t["word_initial"][special]


# ------------------------------------------------------------------ the main job: one pipeline, kill and resume, errors
REPO = Path(__file__).resolve().parent.parent


def job_args(corpus, out, *more) -> list:
    """The main job (stage=all) shrunk to seconds: 4 MT steps, 4 multitask steps, a checkpoint every step."""
    return [f"--data={corpus}", f"--out_dir={out}", "--vocab_size=200", "--mt_steps=4", "--max_steps=4",
            "--batch_seconds=15", "--batch_tokens=300", "--workers=0", "--warmup=3", "--mt_warmup=3", "--bf16=false",
            "--threads=1", "--seed=5", "--log_every=1", "--save_minutes=0", *more]


def run_cli(*args, script="train.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_arguments_run_the_whole_pipeline(tiny_corpus, tmp_path, capsys):
    """`python train.py --key=value` is the main job with overrides: MT stage, multitask stage from it
    (the const recipe by default), evaluation and the results table."""
    summary = train.main(job_args(tiny_corpus, tmp_path))
    mt, st = M.load_checkpoint(tmp_path / "mt" / "last.pt"), M.load_checkpoint(tmp_path / "last.pt")
    assert (mt["step"], mt["config"]["stage"], mt["config"]["lr"]) == (4, "mt", train.TrainConfig.mt_lr)
    assert (st["step"], st["config"]["stage"], st["config"]["recipe"], st["config"]["ctr_weight"]) == (4, "multitask", "const", 1.5)
    assert st["config"]["init_from"] == str(tmp_path / "mt" / "last.pt")
    assert json.loads((tmp_path / "eval_tst-COMMON.json").read_text())["st_bleu"] == summary["st_bleu"]
    out = capsys.readouterr().out
    assert "4 MT steps, then 4 multitask steps (const)" in out and "results on tst-COMMON" in out
    assert "retrieval top-1 s2t, low %" in out and "NOTE" not in out
    # the same command again without --resume would mix two runs: refused, nothing touched
    with pytest.raises(data.UserError, match="already holds a run; continue it with --resume"):
        train.main(job_args(tiny_corpus, tmp_path))
    # --stage=mt: that stage alone, in out_dir itself
    train.main(job_args(tiny_corpus, tmp_path / "one", "--stage=mt"))
    assert M.load_checkpoint(tmp_path / "one" / "last.pt")["config"]["stage"] == "mt"
    assert not (tmp_path / "one" / "mt").exists()


def test_max_minutes_is_said_first_in_the_table(tiny_corpus, tmp_path, capsys):
    train.main(job_args(tiny_corpus, tmp_path, "--max_minutes=0.0001", "--mt_steps=0"))
    out = capsys.readouterr().out
    assert out.index("NOTE: --max_minutes=0.0001 stopped the multitask stage at step") < out.index("results on tst-COMMON")


@pytest.fixture(scope="module")
def uninterrupted_job(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    whole = run_cli(*job_args(tiny_corpus, out, "--final_eval=false"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    return out


@pytest.mark.parametrize("stage,how", [("mt", signal.SIGKILL), ("multitask", signal.SIGKILL), ("multitask", signal.SIGINT)])
def test_killed_main_job_resumes_to_the_same_weights(tiny_corpus, uninterrupted_job, tmp_path, stage, how):
    """A kill at a random step of either stage, then `--resume`: the final weights of both stages
    equal an uninterrupted run's, bitwise. SIGINT saves before it stops and says how to go on."""
    k = random.randint(1, 3)
    print(f"killing the {stage} stage at step {k} with {how.name}")
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "train.py", *job_args(tiny_corpus, out, "--final_eval=false")], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:     # each step's log line; multitask lines carry the st loss
        if line.startswith(f"step {k} ") and ((" st " in line) == (stage == "multitask")):
            p.send_signal(how)
            break
    _, err = p.communicate(timeout=600)
    if how == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
    else:
        assert p.returncode == 1 and "SIGINT at step" in err and "--resume" in err and "Traceback" not in err
    assert (out / ("mt" if stage == "mt" else "") / "last.pt").exists()
    resumed = run_cli(*job_args(tiny_corpus, out, "--final_eval=false", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for ckpt in ("mt/last.pt", "last.pt"):
        a, b = torch.load(uninterrupted_job / ckpt), torch.load(out / ckpt)
        assert a["step"] == b["step"] == 4
        assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"]), ckpt


def test_resume_with_nothing_to_resume_is_one_line(tiny_corpus, tmp_path):
    with pytest.raises(data.UserError, match="nothing to resume in .*no last.pt"):
        train.main(job_args(tiny_corpus, tmp_path / "empty", "--resume"))
    r = run_cli(*job_args(tiny_corpus, tmp_path / "empty", "--resume"))
    assert r.returncode == 1 and r.stderr.startswith("error: nothing to resume") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_vocabulary_too_large_for_the_corpus_is_a_soft_limit(tiny_corpus, capsys):
    vocab = data.build_vocab(tiny_corpus, 5000)
    out = capsys.readouterr().out
    assert len(vocab) < 5000 and f"supports only {len(vocab)} pieces, not the 5000 asked for" in out
    assert vocab.decode(vocab.encode_batch(["the man reads"], "en")[0]) == "the man reads"


class _Evil:
    def __reduce__(self):       # unpickling would create this file
        return (open, ("/tmp/st_align_unsafe_pickle_ran", "w"))


def test_truncated_corrupt_and_unsafe_checkpoints_are_named(tmp_path):
    good = {"model": {"w": torch.zeros(3)}, "config": {}, "model_config": {}, "vocab": "v", "step": 1}
    torch.save(good, tmp_path / "best.pt")
    raw = (tmp_path / "best.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.UserError, match=r"last.pt: truncated or corrupt .*other checkpoints in .*: best.pt"):
        M.load_checkpoint(tmp_path / "last.pt")
    (tmp_path / "noise.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(data.UserError, match="noise.pt: truncated or corrupt"):
        M.load_checkpoint(tmp_path / "noise.pt")
    torch.save({**good, "extra": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(data.UserError, match="evil.pt: refused: .*unsafe pickle"):
        M.load_checkpoint(tmp_path / "evil.pt")
    assert not Path("/tmp/st_align_unsafe_pickle_ran").exists()
    r = run_cli("--ckpt", str(tmp_path / "last.pt"), script="evaluate.py")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "truncated or corrupt" in r.stderr
    assert "Traceback" not in r.stderr


def test_evaluate_finds_a_moved_data_folder_with_data(tiny_corpus, tmp_path):
    import evaluate
    corpus = Path(shutil.copytree(tiny_corpus, tmp_path / "old" / "en-de"))
    train.train(config(corpus, tmp_path / "run", max_steps=2))
    moved = corpus.rename(tmp_path / "new-en-de")
    args = ["--ckpt", str(tmp_path / "run" / "last.pt"), "--tasks", "st", "--beam", "1", "--max_n", "2", "--no_plots"]
    with pytest.raises(data.UserError, match="does not exist: if the data folder moved, pass --data"):
        evaluate.main(args)
    assert evaluate.main(args + ["--data", str(moved)])["n"] == 2


def test_st_only_recipe_trains_the_st_term_alone(tiny_corpus, tmp_path):
    """ConST Table 3's last row: no ASR, MT, CTC or alignment term; the loss is the ST cross-entropy."""
    cfg = train.dataclasses.replace(config(tiny_corpus, tmp_path, max_steps=2), **train.RECIPES["st-only"])
    result = train.train(cfg)
    assert all(set(h) == {"st"} for h in result["history"])
    _, model, batch, _ = _model_and_batch(tiny_corpus)
    loss, terms = train.objective(cfg, model, batch, ("st",))
    st, _, _ = losses.label_smoothed_cross_entropy(model(batch, ("st",)).logits["st"], batch.tgt)
    assert set(terms) == {"st"} and abs(loss.item() - st.item() / batch.tgt_lens.sum().item()) < 1e-5


def _flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def _coefficient(g, ref):
    """c with g = c * ref, checked: g must be collinear with ref."""
    c = (g @ ref / (ref @ ref)).item()
    assert (g - c * ref).norm() <= 1e-3 * g.norm(), "not collinear: a different function, not only a different weight"
    return c


@pytest.mark.parametrize("variant", ["confusion", "grl", "h-align"])
def test_s_align_per_token_ratio_is_the_official_codes(tiny_corpus, variant):
    """Per token, the official S-Align code weighs its adversarial terms' sum_i w_i BCE_i by a / (2B)
    (a mean over the 2B rows D scores) against its ST cross-entropy's 0.7: a ratio a / (1.4 B); L_D
    1.5 a / (1.4 B); H-Align's L_CL by 0.3 alpha N_src / B against 0.7 (losses.adversarial_weights).
    The gradients of our objective must keep these ratios to the gradient of our ST cross-entropy;
    a sum over rows (2B times too strong) or a division by sum(w) fails."""
    a, step, max_steps = 4.0, 30, 100          # a constant until step 50; L_G on; the GRL's lambda > 0
    over = dict(adv_weight=a, adv_variant="grl" if variant == "grl" else "confusion", adv_mixup="none",
                adv_text_noise=False, adv_gen_warmup=0.0, max_steps=max_steps)
    if variant == "h-align":
        over = dict(halign_weight=0.45, halign_tau=0.1)
    cfg, model, batch, vocab = _model_and_batch(tiny_corpus, **over)          # dropout 0: every pass is the same
    aux = train.build_aligners(cfg, model.cfg.d_model)
    tables, tasks, B = train.text_tables(vocab), ("st",), len(batch)
    params, d_params = list(model.parameters()), list(aux.parameters())

    def grad_of(c, wrt=params):
        return _flat_grad(train.objective(c, model, batch, tasks, step, aux, tables)[0], wrt)
    off = train.dataclasses.replace(cfg, adv_weight=0.0, halign_weight=0.0)
    g_term = grad_of(cfg) - grad_of(off)                                       # the alignment term's gradient
    g_st = grad_of(off) - grad_of(train.dataclasses.replace(off, st_weight=0.0))   # the ST cross-entropy's
    # the same quantities written out: the ST cross-entropy summed over tokens, the rows D scores
    out = model(batch, tasks)
    ce_sum, _, _ = losses.label_smoothed_cross_entropy(out.logits["st"], out.targets["st"], cfg.label_smoothing)
    text_high = model.encode(*model.encode_text(batch.src, batch.src_lens))
    k = _coefficient(g_st, _flat_grad(ce_sum, params))                        # our CE enters with weight k = 1 / N
    assert abs(k * batch.tgt_lens.sum().item() - 1) < 1e-4
    if variant == "h-align":
        cl = losses.hard_alignment_loss(out.speech_high, out.speech_lens, text_high, batch.src_lens, 0.1)
        c = _coefficient(g_term, _flat_grad(cl, params))
        official = (0.3 * 1.5 * batch.src_lens.sum().item() / B) / 0.7    # alpha * 0.3 * N_src / B against 0.7
        assert abs(c / k / official - 1) < 1e-3, (c / k, official)
        return
    disc = aux["disc"]
    y = torch.cat([torch.zeros(B), torch.ones(B)])
    w = torch.cat([batch.src_lens, batch.src_lens]).float()

    def weighted_bce_sum(speech, text, target):     # sum_i w_i BCE_i over the 2B rows
        logits = torch.cat([disc(speech, out.speech_lens), disc(text, batch.src_lens)]).squeeze(-1)
        return (w * F.binary_cross_entropy_with_logits(logits, target, reduction="none")).sum()
    if variant == "confusion":
        half = torch.full((2 * B,), 0.5)
        c = _coefficient(g_term, _flat_grad(weighted_bce_sum(out.speech_high, text_high, half), params))
        assert abs(c / k / (a / (1.4 * B)) - 1) < 1e-3, (c / k, a / (1.4 * B))
        # the discriminator's own gradient, from L_D alone: 1.5 a / (1.4 B) per token against the CE
        g_d = grad_of(cfg, d_params)
        c_d = _coefficient(g_d, _flat_grad(weighted_bce_sum(out.speech_high.detach(), text_high.detach(), y), d_params))
        assert abs(c_d / k / (1.5 * a / (1.4 * B)) - 1) < 1e-3, (c_d / k, 1.5 * a / (1.4 * B))
    else:      # one reversed loss with weight a: the encoders get -lambda times its gradient
        lam = losses.grl_lambda(step / max_steps)
        c = _coefficient(g_term, _flat_grad(weighted_bce_sum(out.speech_high, text_high, y), params))
        assert abs(c / k / (-lam * a / (1.4 * B)) - 1) < 1e-3, (c / k, -lam * a / (1.4 * B))


def test_precision_probe_times_our_layer_and_caches_its_pick(tmp_path):
    """bf16=auto's probe times our encoder layer in fp32 and bf16, picks bf16 only for a clear gain, leaves
    the random numbers where they were, and keeps its pick per CPU, torch, thread count and probe version."""
    cache = tmp_path / "precision.json"
    before = torch.get_rng_state()
    choice, why = train.probe_bf16(1, cache)
    assert torch.equal(torch.get_rng_state(), before)
    entry, = json.loads(cache.read_text()).items()
    assert entry[0].endswith("| 1 threads | probe 3") and entry[1]["bf16"] == choice
    assert choice == (entry[1]["bf16_ms"] < 0.9 * entry[1]["fp32_ms"])
    assert train.probe_bf16(1, cache) == (choice, f"cached probe: bf16 {entry[1]['bf16_ms']} ms, fp32 {entry[1]['fp32_ms']} ms")


def test_pretrained_wav2vec2_is_never_lost_silently(tiny_corpus, tmp_path, capsys):
    """`base` without --w2v_path is refused (--w2v_path=none says random on purpose); --init_from an MT stage
    trained without --w2v_path keeps the pretrained wav2vec2 given now instead of its random one, and says so."""
    with pytest.raises(SystemExit, match="--w2v_path=none to start from random weights"):
        train.parse_config(["--preset=base"])
    assert train.parse_config(["--preset=base", "--w2v_path=none"]).w2v_path == "none"
    mcfg = train.model_config(config(tiny_corpus, tmp_path, frontend="wav2vec2"), 200)
    torch.manual_seed(123)
    pretrained = M.Wav2Vec2Model(mcfg.w2v)
    folder = tmp_path / "w2v"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in train.asdict(mcfg.w2v).items()}))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(folder / "model.safetensors"))
    train.train(config(tiny_corpus, tmp_path / "mt", frontend="wav2vec2", stage="mt", max_steps=2))
    capsys.readouterr()
    train.train(config(tiny_corpus, tmp_path / "st", frontend="wav2vec2", w2v_path=str(folder), max_steps=0,
                       init_from=str(tmp_path / "mt" / "last.pt")))
    assert f"wav2vec2 from {folder}, not from" in capsys.readouterr().out
    saved = M.load_checkpoint(tmp_path / "st" / "last.pt")["model"]
    mt = M.load_checkpoint(tmp_path / "mt" / "last.pt")["model"]
    for k, v in pretrained.state_dict().items():
        assert torch.equal(saved[f"wav2vec2.{k}"], v), k
    k = "embed_tokens.weight"
    assert torch.equal(saved[k], mt[k])                   # the rest comes from the MT stage


def test_resume_with_other_settings_and_a_start_of_another_vocabulary_are_one_line_errors(tiny_corpus, tmp_path):
    train.train(config(tiny_corpus, tmp_path / "a", max_steps=1))
    with pytest.raises(data.BadInput, match=r"last.pt was trained with --recipe=xstnet, --adv_weight=0.0, not --recipe=s-align, --adv_weight=4.0: resume"):
        train.train(train.dataclasses.replace(config(tiny_corpus, tmp_path / "a"), recipe="s-align", adv_weight=4.0,
                                              resume=True))
    with pytest.raises(data.BadInput, match=r"embed_tokens.weight has shape \(200, 256\), this model's \(150, 256\)"):
        train.train(config(tiny_corpus, tmp_path / "b", vocab_size=150, max_steps=1,
                           init_from=str(tmp_path / "a" / "last.pt")))
