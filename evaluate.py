"""evaluate.py: decode a split and score it: BLEU and chrF++ (sacreBLEU), WER, cross-modal retrieval.

    python evaluate.py --ckpt runs/demo/last.pt [--split tst-COMMON] [--tasks st,asr,mt,retrieval] [--beam 5]
    python evaluate.py --compare runs/cmp/*       # one markdown table of runs already evaluated

Writes one hypothesis file per task and eval_<split>.json beside the checkpoint, and prints the
JSON summary as its last line.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

import data
import model as M


@torch.no_grad()
def decode(model: M.SpeechTranslator, ds: data.MustcSplit, vocab: data.Vocab, task: str, beam: int = 5,
           indices: list | None = None, device="cpu", bf16: bool = False, batch_seconds: float = 120.0,
           max_sentences: int = 64, lenpen: float = 1.0) -> list:
    """Hypotheses (detokenized text) for `task` (st | asr | mt) on ds[indices], in that order; beam search
    ranks finished hypotheses by log-probability / length ** lenpen (ConST decodes German with 0.7)."""
    model.eval()
    indices = list(range(len(ds))) if indices is None else list(indices)
    lang = vocab.lang_id("en" if task == "asr" else ds.tgt_lang)
    speech = task in ("st", "asr")
    lengths = [ds.segments[i].frames if speech else len(ds.src_ids[i]) for i in indices]
    sampler = data.BucketBatchSampler(lengths, int(batch_seconds * data.SAMPLE_RATE) if speech else 10**9,
                                      max_sentences, shuffle=False)
    hyps = [None] * len(indices)
    # one autocast region for all batches: autocast keeps its bf16 copies of the weights until the region ends,
    # so they are cast once per decode() instead of once per batch (95M numbers for a base wav2vec2)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        for group in sampler.batches(0):
            items = [{"id": "", "audio": ds.read_audio(indices[j]) if speech else torch.zeros(0, device="cpu"),
                      "src": ds.src_ids[indices[j]], "tgt": ds.tgt_ids[indices[j]]} for j in group]
            b = data.collate(items).to(device)
            low, lens = model.encode_speech(b.audio, b.audio_lens) if speech else model.encode_text(b.src, b.src_lens)
            enc = model.encode(low, lens)
            out = model.generate(enc, lens, lang, beam=beam, len_penalty=lenpen) if beam > 1 else model.greedy(enc, lens, lang)
            for j, ids in zip(group, out):
                hyps[j] = vocab.decode(ids)
    return hyps


def bleu(hyps: list, refs: list) -> tuple:
    """Corpus BLEU on detokenized, case-sensitive text (sacreBLEU, tok 13a) and its signature."""
    from sacrebleu.metrics import BLEU
    metric = BLEU()
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())


def chrf(hyps: list, refs: list) -> tuple:
    """chrF++ (character 6-grams and word 2-grams), as ConST's Table 5 reports."""
    from sacrebleu.metrics import CHRF
    metric = CHRF(word_order=2)
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())


def normalize_for_wer(text: str) -> list:
    """Lowercase, punctuation removed (apostrophes inside words kept), split on whitespace."""
    text = re.sub(r"[^\w\s']|(?<!\w)'|'(?!\w)", " ", text.lower())
    return text.split()


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two word lists (substitution, insertion, deletion cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def wer(hyps: list, refs: list) -> float:
    """Word error rate in %: total word edits / total reference words, after normalize_for_wer."""
    edits = sum(edit_distance(normalize_for_wer(r), normalize_for_wer(h)) for h, r in zip(hyps, refs))
    words = sum(len(normalize_for_wer(r)) for r in refs)
    return 100.0 * edits / max(words, 1)


def plot_loss_curves(log_file: Path, out: Path) -> Path | None:
    """Training losses per term against steps, from train.py's log.jsonl (the MT stage's too, if
    beside it); with S-Align, a second panel of the discriminator's and the generator's BCE (the
    S-Align paper's training-curve figure); with SSPC, a panel of its intra- and cross-modal terms."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [(f, "") for f in [log_file] if f.exists()] + [(f, "MT stage ") for f in [log_file.parent / "mt" / "log.jsonl"]
                                                           if f.exists()]
    if not runs:
        return None
    rows = {f: [r for r in map(json.loads, filter(str.strip, f.read_text().splitlines())) if "lr" in r] for f, _ in runs}
    mine = rows[runs[0][0]] if runs[0][1] == "" else []
    panels = ["loss"] + [p for p, key in (("adv", "disc_bce"), ("sspc", "sspc_intra")) if any(key in r for r in mine)]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    ax = axes[0, 0]
    for f, prefix in runs:
        for term in ("st", "asr", "mt", "ctc", "ctr", "l2", "halign", "sspc"):
            pts = [(r["step"], r[term]) for r in rows[f] if r.get(term)]
            if pts:
                ax.plot(*zip(*pts), label=prefix + term.upper(), linestyle="--" if prefix else "-")
    ax.set(xlabel="step", ylabel="loss per target token", title="training losses: each term falling is each task learning", yscale="log")
    ax.legend()
    for ax, panel in zip(axes[0, 1:], panels[1:]):
        if panel == "adv":
            for key, label in (("disc_bce", "discriminator (L_D)"), ("gen_bce", "generator (L_G, target 0.5)")):
                ax.plot([r["step"] for r in mine if key in r], [r[key] for r in mine if key in r], label=label)
            ax.axhline(math.log(2), color="grey", linestyle=":", label="ln 2 (chance / equilibrium)")
            ax.set(xlabel="step", ylabel="BCE per position", title="S-Align: D under ln 2 = it tells the modalities apart; G above it")
        else:
            for key, label in (("sspc_intra", "intra-modal"), ("sspc_cross", "cross-modal")):
                pts = [(r["step"], r[key]) for r in mine if r.get("sspc_on")]
                if pts:
                    ax.plot(*zip(*pts), label=label)
            ax.set(xlabel="step", ylabel="cost (4 terms each)", title="SSPC after the queues filled: falling = structure kept")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_similarity(sims: dict, out: Path, n: int = 40) -> Path:
    """Speech-to-transcript cosine similarity of the first n segments, low and high level: a bright
    diagonal means each utterance is closest to its own transcript."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(sims), figsize=(5 * len(sims), 4.4))
    for ax, (level, sim) in zip(axes, sims.items()):
        im = ax.imshow(sim[:n, :n].numpy(), cmap="viridis")
        ax.set(title=f"{level}-level cos(speech_i, text_j)\na bright diagonal = each utterance closest to its own transcript", xlabel="transcript j", ylabel="utterance i")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def top1(similarity: torch.Tensor) -> float:
    """% of rows whose largest entry is on the diagonal."""
    return 100.0 * (similarity.argmax(1) == torch.arange(len(similarity), device=similarity.device)).float().mean().item()


@torch.no_grad()
def retrieval(model: M.SpeechTranslator, ds: data.MustcSplit, device="cpu", batch_seconds: float = 120.0,
              plot_to: Path | None = None) -> dict:
    """Cross-modal retrieval (ConST §6.2, Table 7): find each utterance's transcript among all of the
    split's by cosine similarity of mean-pooled representations, speech->text and text->speech, before
    (low) and after (high) the shared encoder. Top-1 accuracy in %."""
    model.eval()
    sampler = data.BucketBatchSampler([s.frames for s in ds.segments], int(batch_seconds * data.SAMPLE_RATE), 64,
                                      shuffle=False)
    pooled = {k: [None] * len(ds) for k in ("speech_low", "speech_high", "text_low", "text_high")}
    for group in sampler.batches(0):
        b = data.collate([ds[i] for i in group]).to(device)
        speech_low, speech_lens = model.encode_speech(b.audio, b.audio_lens)
        text_low, text_lens = model.encode_text(b.src, b.src_lens)
        states = {"speech_low": (speech_low, speech_lens), "speech_high": (model.encode(speech_low, speech_lens), speech_lens),
                  "text_low": (text_low, text_lens), "text_high": (model.encode(text_low, text_lens), text_lens)}
        for k, (x, lens) in states.items():                  # no decoder pass: retrieval needs none
            vecs = M.masked_mean(x.float(), lens).cpu()       # the split's vectors gather on the host
            for j, i in enumerate(group):
                pooled[k][i] = vecs[j]
    result, sims = {}, {}
    for level in ("low", "high"):
        s = torch.nn.functional.normalize(torch.stack(pooled[f"speech_{level}"]), dim=-1)
        t = torch.nn.functional.normalize(torch.stack(pooled[f"text_{level}"]), dim=-1)
        sims[level] = s @ t.T
        result[level] = {"s2t": round(top1(sims[level]), 2), "t2s": round(top1(sims[level].T), 2)}
    if plot_to is not None:
        plot_similarity(sims, plot_to)
    return result


def bleu_on(model, ds, vocab, task: str, beam: int = 1, limit: int = 200, device="cpu", bf16: bool = False) -> float:
    """BLEU of `task` on the first `limit` segments of ds (the dev score during training)."""
    idx = list(range(min(limit, len(ds))))
    hyps = decode(model, ds, vocab, task, beam, idx, device, bf16)
    return bleu(hyps, [ds.segments[i].tgt for i in idx])[0]


def average_checkpoints(paths: list) -> dict:
    """fairseq's average_checkpoints: the element-wise mean of the model weights of several checkpoints of one
    run (the first checkpoint's config, vocabulary and step come along). A checkpoint of another model or
    vocabulary is an error that names it."""
    ckpts = [M.load_checkpoint(p) for p in paths]
    first = ckpts[0]
    for p, c in zip(paths[1:], ckpts[1:]):
        if c["model_config"] != first["model_config"] or c["vocab"] != first["vocab"] or c["model"].keys() != first["model"].keys():
            raise data.BadInput(f"{p}: not the same model and vocabulary as {paths[0]}; average checkpoints of one run")
    mean = {k: sum(c["model"][k].double() for c in ckpts).div(len(ckpts)).to(v.dtype) if v.is_floating_point() else v
            for k, v in first["model"].items()}
    return {**first, "model": mean, "averaged": [str(p) for p in paths]}


def load(ckpt_path, device="cpu", data_dir: str | Path | None = None) -> tuple:
    """(model, vocab, checkpoint) from a checkpoint written by train.py, or from the average of several (a list
    of paths). `data_dir`: the en-XX folder if it moved since training (the vocabulary lives in it)."""
    paths = [ckpt_path] if isinstance(ckpt_path, (str, Path)) else list(ckpt_path)
    ckpt = M.load_checkpoint(paths[0]) if len(paths) == 1 else average_checkpoints(paths)
    ckpt_path = paths[0]
    vocab_path = Path(ckpt["vocab"]) if data_dir is None else Path(data_dir) / Path(ckpt["vocab"]).name
    if not vocab_path.exists():
        raise data.Missing(f"{vocab_path}, the vocabulary of {ckpt_path}, does not exist: if the data folder moved, "
                           f"pass --data=/its/new/en-xx")
    model = M.SpeechTranslator.from_checkpoint(ckpt)
    return model.to(device).eval(), data.Vocab(vocab_path), ckpt


def results_table(summary: dict, minutes: float | None = None, notes: list = ()) -> str:
    """The main job's closing table; `notes` (e.g. a wall-time guard that fired) come first."""
    r = summary.get("retrieval", {})
    rows = [("ST BLEU", summary.get("st_bleu")), ("MT BLEU", summary.get("mt_bleu")), ("ASR WER %", summary.get("asr_wer")),
            ("ST chrF++", summary.get("chrf")),
            ("retrieval top-1 s2t, low %", r.get("low", {}).get("s2t")),
            ("retrieval top-1 s2t, high %", r.get("high", {}).get("s2t"))]
    lines = [f"NOTE: {n}" for n in notes] + [f"results on {summary['split']} ({summary['n']} segments)" + (f", {minutes:.1f} min in all" if minutes else "")]
    lines += [f"  {name:<30} {value:>7.2f}" for name, value in rows if value is not None]
    return "\n".join(lines)


def compare_table(run_dirs: list, split: str = "tst-COMMON") -> str:
    """A markdown table of the eval_<split>.json of several runs (one row per run directory)."""
    head = ("| run | ST BLEU | MT BLEU | ASR WER % | ST chrF++ | s2t low % | t2s low % | s2t high % | t2s high % |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for d in run_dirs:
        f = Path(d) / f"eval_{split}.json"
        if not f.exists():
            raise FileNotFoundError(f"{f} does not exist; run python evaluate.py --ckpt {d}/last.pt first")
        r = json.loads(f.read_text())
        ret = r.get("retrieval", {})
        cells = [r.get("st_bleu"), r.get("mt_bleu"), r.get("asr_wer"), r.get("chrf"),
                 *(ret.get(level, {}).get(way) for level in ("low", "high") for way in ("s2t", "t2s"))]
        lines.append(f"| {Path(d).name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", nargs="+", help="a checkpoint written by train.py; several: their average (fairseq's "
                   "average_checkpoints, e.g. runs/x/step_*.pt of --keep_last)")
    p.add_argument("--save_average", help="with several --ckpt: also write their average to this file")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="print one table of these runs' saved results")
    p.add_argument("--split", default="tst-COMMON", help="the split to score: tst-COMMON, dev, tst-HE, train")
    p.add_argument("--data", help="the en-XX folder, if it moved since training (default: the checkpoint's)")
    p.add_argument("--tasks", default="st,asr,mt,retrieval",
                   help="comma-separated: st (BLEU, chrF++), asr (WER), mt (BLEU), retrieval (top-1 %%)")
    p.add_argument("--beam", type=int, default=5, help="beam size (1: greedy search)")
    p.add_argument("--lenpen", type=float, default=1.0,
                   help="length penalty: hypotheses ranked by log-probability / length ** lenpen (ConST: 0.7 for German)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--max_n", type=int, default=0, help="score only the first N segments (0 = all)")
    p.add_argument("--quiet", action="store_true", help="no signatures and per-task lines")
    p.add_argument("--no_plots", action="store_true", help="skip similarity_<split>.png and loss_curves.png")
    a = p.parse_args(argv)
    if a.compare:
        table = compare_table(a.compare, a.split)
        print(table)
        return {"table": table}
    if not a.ckpt:
        p.error("give --ckpt (or --compare RUN_DIR ...)")
    model, vocab, ckpt = load(a.ckpt, a.device, a.data)
    tag = "" if len(a.ckpt) == 1 else "_avg"            # an average's results sit beside, not over, the run's
    if a.save_average and len(a.ckpt) > 1:
        tmp = Path(a.save_average + ".tmp")
        torch.save(ckpt, tmp)
        tmp.replace(a.save_average)                   # atomic, as train.py's checkpoints
    root = Path(a.data or ckpt["config"]["data"])
    if not (root / "data" / a.split).is_dir():
        raise data.Missing(f"{root / 'data' / a.split} does not exist: if the data folder moved since training, "
                           f"pass --data=/its/new/en-xx")
    ds = data.MustcSplit(root, a.split, vocab, verbose=False)
    if a.max_n:
        ds.segments, ds.src_ids, ds.tgt_ids = ds.segments[:a.max_n], ds.src_ids[:a.max_n], ds.tgt_ids[:a.max_n]
    out_dir, summary = Path(a.ckpt[0]).parent, {"split": a.split, "n": len(ds), "ckpt": " + ".join(a.ckpt), "beam": a.beam,
                                          "lenpen": a.lenpen}
    say = (lambda *x: None) if a.quiet else print
    for task in [t for t in a.tasks.split(",") if t in ("st", "asr", "mt")]:
        hyps = decode(model, ds, vocab, task, a.beam, device=a.device, lenpen=a.lenpen)
        (out_dir / f"hyp_{a.split}{tag}_{task}.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        if task == "asr":
            summary["asr_wer"] = round(wer(hyps, [s.src for s in ds.segments]), 2)
            say(f"ASR WER {summary['asr_wer']:.2f} (lowercase, punctuation removed)")
        else:
            refs = [s.tgt for s in ds.segments]
            score, sig = bleu(hyps, refs)
            summary[f"{task}_bleu"] = round(score, 2)
            if task == "st":
                summary["chrf"], chrf_sig = chrf(hyps, refs)
                summary["chrf"] = round(summary["chrf"], 2)
                summary["signature"] = {"bleu": sig, "chrf": chrf_sig}
            say(f"{task.upper()} BLEU {score:.2f}  [{sig}]")
    if "retrieval" in a.tasks:
        plot = None if a.no_plots else out_dir / f"similarity_{a.split}{tag}.png"
        summary["retrieval"] = retrieval(model, ds, a.device, plot_to=plot)
    if not a.no_plots:
        plot_loss_curves(out_dir / "log.jsonl", out_dir / "loss_curves.png")
    (out_dir / f"eval_{a.split}{tag}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except data.UserError as err:         # a mistake in the input: one line; a bug keeps its traceback
        sys.exit(f"error: {err}")
