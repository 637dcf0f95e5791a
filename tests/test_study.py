"""Tests of study.py: the table is the runs' mean and standard deviation, a rerun skips finished runs,
an interrupted run resumes."""
import json
import statistics

import pytest

import evaluate
import study
import train


def _table(path) -> dict:
    """{arm: {column: (mean, std)}} read back from study.md."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    head, body = rows[0], [r for r in rows[1:] if r[0].startswith("`")]
    return {r[0].strip("`"): {col: tuple(map(float, cell.split(" ± "))) for col, cell in zip(head[2:], r[2:])}
            for r in body}


def test_study_table_resume_and_skip(tiny_corpus, tmp_path, monkeypatch):
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--steps", "3", "--seeds", "1", "2", "--arms", "xstnet", "s-align", "--out", str(out), "--results",
            str(results), "--mt_steps", "2", "--save_every", "2", f"--data={tiny_corpus}", "--vocab_size=200",
            "--batch_seconds=15.0", "--batch_tokens=400", "--workers=0", "--warmup=5", "--bf16=false", "--threads=1",
            "--eval_dev_max=2"]
    study.main(argv)
    runs = {(arm, seed): out / arm / f"seed{seed}" for arm in ("xstnet", "s-align") for seed in (1, 2)}
    init = {json.loads((d / "study.json").read_text())["arm"] for d in runs.values()}
    assert init == {"xstnet", "s-align"} and (results / "study.png").exists()
    for d in runs.values():       # every run started from the one MT-stage checkpoint, with the same budget
        log = (d / "log.jsonl").read_text()
        assert '"step": 3' in log and not (d / "best.pt").exists()
    table = _table(results / "study.md")
    assert set(table) == {"xstnet", "s-align"}
    for arm in table:
        evals = [json.loads((runs[arm, s] / "eval_tst-COMMON.json").read_text()) for s in (1, 2)]
        for column, path in study.METRICS.items():
            xs = [study.value(e, path) for e in evals]
            mean, std = table[arm][column]
            assert abs(mean - statistics.mean(xs)) <= 0.005 and abs(std - statistics.stdev(xs)) <= 0.005, (arm, column)
    # a rerun trains and evaluates nothing; a run that lost its evaluation resumes from its checkpoint
    calls = []
    real_train, real_eval = train.train, evaluate.main
    monkeypatch.setattr(train, "train", lambda cfg: calls.append(cfg) or real_train(cfg))
    monkeypatch.setattr(evaluate, "main", lambda argv: calls.append(argv) or real_eval(argv))
    before = (results / "study.md").read_text()
    study.main(argv)
    assert calls == [] and (results / "study.md").read_text().split("Wall")[0] == before.split("Wall")[0]
    (runs["s-align", 2] / "eval_tst-COMMON.json").unlink()
    study.main(argv)
    assert len(calls) == 2 and calls[0].resume and calls[0].seed == 2 and calls[0].adv_weight == 4.0
    assert (runs["s-align", 2] / "eval_tst-COMMON.json").exists()


def test_diagnostics_read_the_game_and_the_anchors_from_the_logs(tmp_path):
    """C4 and C5 of the README's claims come from these numbers: the phases of S-Align's game split
    on a (full strength vs decayed to 0), SSPC's anchor entropy only once its queues are full."""
    run = tmp_path / "s-align" / "seed1"
    run.mkdir(parents=True)
    (run / study.EVAL).write_text("{}")
    rows = [{"step": 25, "lr": 1, "disc_bce": 0.6, "disc_acc": 0.7, "gen_bce": 0.8, "adv_a": 4.0},
            {"step": 50, "lr": 1, "disc_bce": 0.5, "disc_acc": 0.9, "gen_bce": 0.9, "adv_a": 4.0},
            {"step": 75, "lr": 1, "disc_bce": 0.69, "disc_acc": 0.5, "gen_bce": 0.7, "adv_a": 2.0},
            {"step": 100, "lr": 1, "disc_bce": 0.3, "disc_acc": 0.95, "gen_bce": 1.5, "adv_a": 0.0},
            {"step": 100, "dev_st_bleu": 3.0}]
    (run / "log.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    sspc = tmp_path / "sspc" / "seed1"
    sspc.mkdir(parents=True)
    (sspc / study.EVAL).write_text("{}")
    (sspc / "log.jsonl").write_text("\n".join(json.dumps({"step": s, "lr": 1, "anchor_entropy": e, "sspc_on": on})
                                              for s, e, on in ((25, 1.0, 0.0), (50, 4.0, 1.0), (75, 4.1, 1.0))))
    d = study.diagnostics(tmp_path, ["s-align", "sspc", "xstnet"], [1, 2])
    assert set(d) == {"s-align", "sspc"}
    assert d["s-align"]["D BCE, a full"] == [pytest.approx(0.55)] and d["s-align"]["G BCE, a full"] == [pytest.approx(0.85)]
    assert d["s-align"]["D accuracy, a = 0"] == [pytest.approx(0.95)] and d["s-align"]["D BCE, a = 0"] == [pytest.approx(0.3)]
    assert d["sspc"]["anchor entropy"] == [pytest.approx(4.05)]
