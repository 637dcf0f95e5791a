"""Tests of evaluate.py: every metric against hand-computed values, detokenized BLEU, the CLI summary."""
import json

import pytest
import torch

import data
import evaluate
import model as M
import train


def test_edit_distance_and_wer_by_hand():
    assert evaluate.edit_distance("a b c".split(), "a b c".split()) == 0
    assert evaluate.edit_distance("a x c".split(), "a b c d".split()) == 2        # one substitution, one insertion
    assert evaluate.edit_distance([], "a b".split()) == 2
    assert evaluate.edit_distance("kitten sat".split(), "sitting".split()) == 2
    # normalisation: case and punctuation do not count, apostrophes inside words do
    assert evaluate.normalize_for_wer("The dog's ball, 'quickly'!") == ["the", "dog's", "ball", "quickly"]
    assert evaluate.wer(["the cat sat"], ["The cat sat."]) == 0.0
    assert evaluate.wer(["a b c d"], ["a x c"]) == pytest.approx(200 / 3)          # 2 edits / 3 reference words
    # corpus WER pools edits and words, it does not average sentence WERs
    assert evaluate.wer(["a", "x y z w"], ["a", "b"]) == pytest.approx(100 * 4 / 2)


def test_bleu_and_chrf_by_hand():
    refs = ["Der alte Mann liest ein Buch.", "Die Katze schläft im Garten."]
    assert evaluate.bleu(refs, refs)[0] == pytest.approx(100.0)
    assert evaluate.chrf(refs, refs)[0] == pytest.approx(100.0)
    score, sig = evaluate.bleu(["Der alte Mann liest.", "Die Katze schläft."], refs)
    assert 0 < score < 100 and "case:mixed" in sig and "tok:13a" in sig
    # case-sensitive: lowercasing the hypothesis lowers the score
    assert evaluate.bleu([r.lower() for r in refs], refs)[0] < 100
    sig = evaluate.chrf(refs, refs)[1]
    assert "nc:6" in sig and "nw:2" in sig


def test_retrieval_top1_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.0, 0.1, 0.5]])
    assert evaluate.top1(sim) == pytest.approx(200 / 3)        # row 1 prefers column 0
    assert evaluate.top1(sim.T) == pytest.approx(100.0)


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = train.TrainConfig(data=str(tiny_corpus), out_dir=str(out), vocab_size=200, max_steps=3, batch_seconds=15.0,
                            workers=0, eval_every=10**9, warmup=5, bf16="false", threads=1)
    return train.train(cfg)["last"]


class CopyModel(torch.nn.Module):
    """Stands in for a perfect model on MT: its 'translation' is the source pieces, copied."""

    def encode_text(self, tokens, lens):
        return tokens[..., None].float(), lens

    def encode(self, states, lens):
        return states

    def greedy(self, enc, lens, lang, **kw):
        return [enc[i, 1:int(n) - 1, 0].long().tolist() for i, n in enumerate(lens)]


def test_bleu_is_computed_on_detokenized_text(tiny_corpus):
    """The decoded hypotheses are detokenized strings: a model that outputs the right pieces
    scores BLEU 100 against the text, while the same pieces left as pieces would score far lower."""
    vocab = data.build_vocab(tiny_corpus, 200, verbose=False)
    ds = data.MustcSplit(tiny_corpus, "train", vocab, verbose=False)   # every character is in the vocabulary
    hyps = evaluate.decode(CopyModel(), ds, vocab, "mt", beam=1)
    refs = [s.src for s in ds.segments]
    assert hyps == refs and "\u2581" not in "".join(hyps)
    assert evaluate.bleu(hyps, refs)[0] == pytest.approx(100.0)
    pieces = [" ".join(vocab.sp.encode(r, out_type=str)) for r in refs]
    assert evaluate.bleu(pieces, refs)[0] < 50


def test_evaluate_cli_writes_hypotheses_and_summary(trained, capsys):
    summary = evaluate.main(["--ckpt", trained, "--split", "dev", "--beam", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(summary))
    for key in ("st_bleu", "mt_bleu", "asr_wer", "chrf", "retrieval"):
        assert key in summary
    for level in ("low", "high"):
        assert set(summary["retrieval"][level]) == {"s2t", "t2s"}
        assert all(0 <= v <= 100 for v in summary["retrieval"][level].values())
    folder = train.Path(trained).parent
    assert json.loads((folder / "eval_dev.json").read_text())["n"] == 8
    for task in ("st", "asr", "mt"):
        assert len((folder / f"hyp_dev_{task}.txt").read_text().splitlines()) == 8
    for png in ("similarity_dev.png", "loss_curves.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"


def test_loss_curves_have_adversarial_and_sspc_panels_and_runs_compare(tmp_path):
    import matplotlib.image
    rows = [{"step": s, "lr": 1e-3, "st": 3.0 / s, "ctc": 2.0 / s, "adv_d": 1.0, "disc_bce": 0.6, "gen_bce": 0.7,
             "sspc": 0.1 * (s > 2), "sspc_intra": 3.5, "sspc_cross": 3.4, "sspc_on": float(s > 2)} for s in range(1, 6)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = evaluate.plot_loss_curves(tmp_path / "log.jsonl", tmp_path / "curves.png")
    h, w = matplotlib.image.imread(out).shape[:2]
    assert w > 2.5 * h                                      # three panels side by side
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s, "lr": 1e-3, "st": 1.0}) + "\n" for s in (1, 2)))
    h, w = matplotlib.image.imread(evaluate.plot_loss_curves(tmp_path / "log.jsonl", tmp_path / "one.png")).shape[:2]
    assert w < 2 * h                                        # one panel without the alignment terms
    for name, st in (("xstnet", 20.5), ("const", 22.25)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval_tst-COMMON.json").write_text(json.dumps(
            {"st_bleu": st, "mt_bleu": 50.0, "asr_wer": 30.0, "retrieval": {"low": {"s2t": 2.0, "t2s": 3.0}}}))
    table = evaluate.compare_table([tmp_path / "xstnet", tmp_path / "const"]).splitlines()
    assert table[2].startswith("| xstnet | 20.50 | 50.00 | 30.00 | - | 2.00 | 3.00 | - | - |")
    assert table[3].startswith("| const | 22.25 |")
    with pytest.raises(FileNotFoundError, match="eval_tst-COMMON.json does not exist"):
        evaluate.compare_table([tmp_path])


def test_keep_last_keeps_n_weight_files_and_their_average_is_the_mean_of_their_tensors(tiny_corpus, tmp_path):
    """--keep_last=3 with a dev evaluation every step keeps step_3..5.pt of 5 (weights, config, vocabulary);
    evaluate.py --ckpt with several averages them (fairseq's average_checkpoints): every float tensor the mean
    of the three, written atomically with --save_average, scored beside the run's own results."""
    cfg = train.TrainConfig(data=str(tiny_corpus), out_dir=str(tmp_path), vocab_size=200, max_steps=5,
                            batch_seconds=15.0, workers=0, eval_every=1, eval_dev_max=2, warmup=2, bf16="false",
                            threads=1, keep_last=3)
    train.train(cfg)
    kept = sorted(tmp_path.glob("step_*.pt"))
    assert [p.name for p in kept] == ["step_3.pt", "step_4.pt", "step_5.pt"]
    states = [torch.load(p)["model"] for p in kept]
    assert not torch.equal(states[0]["embed_tokens.weight"], states[2]["embed_tokens.weight"])   # they differ
    summary = evaluate.main(["--ckpt", *map(str, kept), "--save_average", str(tmp_path / "avg.pt"), "--split", "dev",
                             "--tasks", "mt", "--beam", "1", "--no_plots", "--quiet"])
    avg = M.load_checkpoint(tmp_path / "avg.pt")
    for k, v in avg["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(s[k] for s in states) / 3, rtol=0, atol=1e-6)
    assert avg["averaged"] == [str(p) for p in kept] and (tmp_path / "eval_dev_avg.json").exists()
    assert summary["ckpt"].count(" + ") == 2 and "mt_bleu" in summary
    other = dict(torch.load(kept[0]), model_config={**avg["model_config"], "d_model": 8})
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(data.BadInput, match="other.pt: not the same model"):
        evaluate.average_checkpoints([kept[1], tmp_path / "other.pt"])
