"""study.py: the reproduction study. Every recipe, from one MT-stage checkpoint, with several seeds.

    python study.py --steps 250 --seeds 1 2 3 --out runs/study            # table and figure in results/
    python study.py --steps 250 --seeds 1 2 3 --init_from=runs/demo/mt/last.pt --arms xstnet s-align

Each run is train.py's multitask stage with one arm's recipe, the same number of steps and the same
MT-stage checkpoint (--init_from; without it the main job's MT stage is trained once in OUT/mt),
scored on tst-COMMON with beam 5 by evaluate.py. Runs go seed by seed, arm by arm, in OUT/<arm>/seed<k>.
A run whose eval_tst-COMMON.json exists is skipped; an interrupted one resumes from its last checkpoint
(train.py --resume, every --save_every steps): kill the command and start it again at any time.
Arguments of the form --key=value that study.py does not know go to train.py (--data, --threads, ...).
At the end: OUT's runs of the given arms and seeds as mean ± sample standard deviation in
RESULTS/study.md, and bars with error bars per arm in RESULTS/study.png.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import dataclasses
import sys
import time
from pathlib import Path

import evaluate
import train

# arm -> train.py arguments: ConST Table 3 (st-only, xstnet, const), Fig. 4's best view set, S-Align's
# three rows (h-align, s-align, s+h), SSPC alone and with ConST
ARMS = {
    "st-only": ["--recipe=st-only"],
    "xstnet": ["--recipe=xstnet"],
    "const": ["--recipe=const", "--ctr_views=original"],
    "const+scut": ["--recipe=const"],            # the recipe's own views: Original+SCut
    "h-align": ["--recipe=h-align"],
    "s-align": ["--recipe=s-align"],
    "s+h": ["--recipe=s+h"],
    "sspc": ["--recipe=sspc"],
    "sspc+const": ["--recipe=sspc+const"],
}
# column -> where it is in eval_tst-COMMON.json
METRICS = {"ST BLEU": ("st_bleu",), "MT BLEU": ("mt_bleu",), "ASR WER %": ("asr_wer",),
           "s2t low %": ("retrieval", "low", "s2t"), "s2t high %": ("retrieval", "high", "s2t")}
EVAL = "eval_tst-COMMON.json"


def mt_checkpoint(a, extra: list) -> Path:
    """The checkpoint every run starts from: --init_from, or the main job's MT stage trained once."""
    if a.init_from:
        return Path(a.init_from)
    path = Path(a.out) / "mt" / "last.pt"
    if not path.exists():          # the main job's MT stage (its mt_steps, mt_lr, mt_warmup, batch_tokens)
        cfg = train.parse_config([*extra, f"--out_dir={path.parent}", "--seed=1"])
        train.train(dataclasses.replace(cfg, stage="mt", max_steps=a.mt_steps or cfg.mt_steps, lr=cfg.mt_lr,
                                        warmup=cfg.mt_warmup, eval_every=0, final_eval=False))
    return path


def run(arm: str, seed: int, a, extra: list, init: Path) -> Path:
    """Train one arm with one seed (or resume it, or skip it when it has been evaluated); its directory."""
    out = Path(a.out) / arm / f"seed{seed}"
    if (out / EVAL).exists():
        print(f"study: {arm} seed {seed} is done ({out / EVAL})")
        return out
    resume = (out / "last.pt").exists()
    if not resume:
        (out / "log.jsonl").unlink(missing_ok=True)        # a run killed before its first checkpoint starts over
    print(f"study: {arm} seed {seed}: {'resuming' if resume else 'training'} in {out}")
    t0 = time.time()
    # dev BLEU at each checkpoint on 50 segments only (the study scores tst-COMMON); --eval_dev_max=N overrides
    argv = ["--eval_dev_max=50", *extra, *ARMS[arm], f"--seed={seed}", f"--max_steps={a.steps}", f"--init_from={init}",
            f"--out_dir={out}", f"--eval_every={a.save_every}", "--final_eval=false", *(["--resume"] if resume else [])]
    train.train(train.parse_config(argv))
    (out / "best.pt").unlink(missing_ok=True)       # the study scores last.pt: the same budget for every arm
    t1 = time.time()
    evaluate.main(["--ckpt", str(out / "last.pt"), "--split", "tst-COMMON", "--beam", "5", "--quiet"]
                  + (["--max_n", str(a.max_n)] if a.max_n else []))
    timing = {"train_minutes": (t1 - t0) / 60, "eval_minutes": (time.time() - t1) / 60}
    record = {"arm": arm, "seed": seed, "steps": a.steps, "resumed": resume, **timing}
    (out / "study.json").write_text(json.dumps(record))
    return out


def value(result: dict, path: tuple) -> float:
    for key in path:
        result = result[key]
    return float(result)


def collect(out: Path, arms: list, seeds: list) -> dict:
    """{arm: {metric: [value per finished seed]}} from the runs' eval_tst-COMMON.json."""
    table = {}
    for arm in arms:
        results = [json.loads(f.read_text()) for f in (out / arm / f"seed{s}" / EVAL for s in seeds) if f.exists()]
        if results:
            table[arm] = {m: [value(r, path) for r in results] for m, path in METRICS.items()}
    return table


def diagnostics(out: Path, arms: list, seeds: list) -> dict:
    """What the claims C4 and C5 need, from each finished run's log.jsonl (one row per 25 steps):
    S-Align's game while a is at full strength and after it has decayed to 0 (the discriminator's BCE
    and accuracy, the generator's BCE; ln 2 = chance), and SSPC's anchor-usage entropy once its
    queues are full. {arm: {quantity: [value per seed]}}."""
    found = {}
    for arm in arms:
        for seed in seeds:
            log = out / arm / f"seed{seed}" / "log.jsonl"
            if not (out / arm / f"seed{seed}" / EVAL).exists() or not log.exists():
                continue
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if "lr" in r]
            values = {}
            game = [r for r in rows if "disc_bce" in r and "adv_a" in r]
            if game:
                top = max(r["adv_a"] for r in game)
                for phase, keep in (("a full", lambda r: r["adv_a"] >= 0.999 * top), ("a = 0", lambda r: r["adv_a"] == 0)):
                    sel = [r for r in game if keep(r)]
                    for key, name in (("disc_bce", "D BCE"), ("disc_acc", "D accuracy"), ("gen_bce", "G BCE")):
                        if sel:
                            values[f"{name}, {phase}"] = statistics.mean(r[key] for r in sel)
            anchors = [r["anchor_entropy"] for r in rows if r.get("sspc_on") == 1.0 and "anchor_entropy" in r]
            if anchors:
                values["anchor entropy"] = statistics.mean(anchors)
            for k, v in values.items():
                found.setdefault(arm, {}).setdefault(k, []).append(v)
    return found


def mean_std(xs: list) -> tuple:
    """Mean and sample standard deviation (n - 1; 0 for one run)."""
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def write_table(table: dict, out: Path, results: Path, steps: int, seeds: list) -> Path:
    lines = [f"Demo corpus, tst-COMMON (beam 5); {steps} multitask steps per run from one MT-stage checkpoint; "
             f"seeds {', '.join(map(str, seeds))}; mean ± sample standard deviation over seeds.", "",
             "| recipe | runs | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for arm, cols in table.items():
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in (mean_std(xs) for xs in cols.values())]
        lines.append(f"| `{arm}` | {len(next(iter(cols.values())))} | " + " | ".join(cells) + " |")
    times = [json.loads(f.read_text()) for f in out.glob("*/seed*/study.json")]
    if times:
        minutes = sum(t["train_minutes"] + t["eval_minutes"] for t in times)
        lines += ["", f"Wall time of the {len(times)} runs' last invocations: {minutes:.1f} min "
                      f"(training {sum(t['train_minutes'] for t in times):.1f}, evaluation "
                      f"{sum(t['eval_minutes'] for t in times):.1f})."]
    diag = diagnostics(out, list(table), seeds)
    if diag:
        lines += ["", "Diagnostics from the runs' logs (mean over logged steps, then mean ± std over seeds; ln 2 = "
                      f"{math.log(2):.3f} is chance for D's BCE and the equilibrium of G's; anchor entropy is at most "
                      "ln K of the K anchors):", ""]
        for arm, cols in diag.items():
            lines.append(f"- `{arm}`: " + "; ".join(f"{k} {m:.3f} ± {s:.3f}" for k, (m, s) in
                                                    ((k, mean_std(v)) for k, v in cols.items())))
    path = results / "study.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(table: dict, path: Path, title: str) -> Path:
    """One panel per metric: a bar per arm at its mean, error bars of one standard deviation, a dot per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 4.2))
    arms = list(table)
    for ax, metric in zip(axes, METRICS):
        stats = [mean_std(table[arm][metric]) for arm in arms]
        ax.bar(range(len(arms)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, alpha=0.7)
        for i, arm in enumerate(arms):
            ax.plot([i] * len(table[arm][metric]), table[arm][metric], "k.", markersize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=60, ha="right")
        ax.set_title(metric)
    fig.suptitle(title + " (bars: mean, error bars: standard deviation, dots: seeds;\nonly a gap wider than the error bars is an effect)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--steps", type=int, required=True, help="multitask steps of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", default="runs/study")
    p.add_argument("--results", default="results", help="where study.md and study.png go")
    p.add_argument("--init_from", default="", help="the MT-stage checkpoint; default: train it in OUT/mt")
    p.add_argument("--mt_steps", type=int, default=0, help="of that MT stage (0: the main job's)")
    p.add_argument("--save_every", type=int, default=100, help="checkpoint (and dev BLEU) interval of each run")
    p.add_argument("--max_n", type=int, default=0, help="score only the first N test segments (0 = all)")
    a, extra = p.parse_known_args(argv)
    train.parse_config(extra)                   # the rest must be train.py's --key=value settings
    t0 = time.time()
    init = mt_checkpoint(a, extra)
    for seed in a.seeds:
        for arm in a.arms:
            run(arm, seed, a, extra, init)
    out, results = Path(a.out), Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    table = collect(out, a.arms, a.seeds)
    md = write_table(table, out, results, a.steps, a.seeds)
    png = plot(table, results / "study.png", f"tst-COMMON, {a.steps} steps, seeds {' '.join(map(str, a.seeds))}")
    print(md.read_text() + f"figure: {png}; {(time.time() - t0) / 60:.1f} min in this invocation")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
