"""train.py: the config, then one flat training loop.

    python train.py                                   # the main job: demo corpus, tiny model, CPU, <= 20 min
    python train.py --preset=base --data=/path/to/en-de --w2v_path=/path/to/wav2vec_small.pt   # the paper
    python train.py --stage=mt --max_steps=2000       # MT pre-training only (text), then --init_from=...
    torchrun --nproc_per_node=2 train.py ...          # DDP

Every field of TrainConfig can be set as --key=value; the resolved config is printed and saved in
each checkpoint. The objective is ConST Eq. 1 as one visible weighted sum (see `objective`).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch

import data
import model as M
from losses import contrastive_loss, ctc_loss, label_smoothed_cross_entropy


@dataclass
class TrainConfig:
    preset: str = "tiny"            # tiny (CPU demo) | base (the papers' model and recipe)
    recipe: str = "xstnet"          # which alignment terms are on: see RECIPES
    data: str = "demo_data/en-de"   # an en-XX folder in MuST-C layout; the demo corpus is built there if absent
    out_dir: str = "runs/demo"
    stage: str = "multitask"        # multitask (ST + ASR + MT on speech batches) | mt (text-only pre-training)
    init_from: str = ""             # a checkpoint whose model weights start this run (e.g. the MT stage)
    resume: bool = False            # continue exactly from out_dir/last.pt
    seed: int = 1
    device: str = "auto"            # auto | cpu | cuda
    bf16: str = "auto"              # auto (CUDA, or a CPU with native bf16) | true | false
    threads: int = 0                # torch CPU threads; 0 = all cores
    # model
    frontend: str = "logmel"        # wav2vec2 | logmel
    w2v_path: str = ""              # pretrained wav2vec2 (HF folder or fairseq .pt)
    vocab_size: int = 1000
    dropout: float = 0.1
    # data and batches
    max_audio_seconds: float = 30.0
    batch_seconds: float = 60.0     # padded audio per batch
    batch_tokens: int = 4000        # padded tokens per text-only batch
    max_sentences: int = 100
    workers: int = 1
    # objective (ConST Eq. 1; the alignment terms of losses.py / sinkhorn.py join this sum)
    st_weight: float = 1.0
    asr_weight: float = 1.0
    mt_weight: float = 1.0
    ctc_weight: float = 1.0
    ctr_weight: float = 0.0         # lambda of ConST's contrastive term (Eq. 1); the `const` recipe sets 1.5
    ctr_tau: float = 0.02           # its temperature
    label_smoothing: float = 0.1
    reencode_asr: bool = False      # ConST encodes the speech again for ASR; False reuses the ST pass (CPU)
    # optimisation
    lr: float = 2e-3
    w2v_lr_scale: float = 1.0       # wav2vec2's lr = lr * this
    warmup: int = 200
    clip: float = 1.0
    accum: int = 1
    max_steps: int = 1300
    max_minutes: float = 0.0        # stop at this wall time too; 0 = no limit
    freeze_w2v_steps: int = 0
    max_bad_steps: int = 20         # this many non-finite losses in a row stop the run
    # logging and evaluation
    log_every: int = 25
    eval_every: int = 500
    eval_beam: int = 1
    eval_dev_max: int = 200         # dev segments decoded at each evaluation
    final_eval: bool = True         # evaluate tst-COMMON at the end and print the results table


TRAIN_PRESETS = {
    "tiny": {},
    # METHODS §1.8: Adam(0.9, 0.98), lr 1e-4, inverse-sqrt warmup 25k, clip 10, 1M samples per GPU, update-freq 2
    "base": dict(frontend="wav2vec2", vocab_size=10_000, dropout=0.1, batch_seconds=62.5, max_sentences=10_000,
                 lr=1e-4, warmup=25_000, clip=10.0, accum=2, max_steps=500_000, ctc_weight=0.0, reencode_asr=True,
                 eval_every=1000, eval_beam=4, eval_dev_max=10**9, max_audio_seconds=30.0, workers=4),
}
# Named recipes set the papers' values. xstnet: ConST Eq. 1 without the alignment term. const: with
# the contrastive term on low-level states, lambda 1.5 and tau 0.02 for En-De (ConST §4.1).
RECIPES = {"xstnet": {}, "const": {"ctr_weight": 1.5, "ctr_tau": 0.02}}


def parse_config(argv: list) -> TrainConfig:
    """--key=value overrides, type-checked against TrainConfig; unknown keys list close matches."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    given = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"expected --key=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            raise SystemExit(f"unknown config key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                              f"; known keys: {', '.join(fields)}"))
        typ = type(fields[key].default)
        if not eq and typ is bool:
            value = "true"
        try:
            if typ is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                given[key] = value.lower() in ("true", "1")
            else:
                given[key] = typ(value)
        except ValueError:
            raise SystemExit(f"--{key} expects a {typ.__name__}, got {value!r}") from None
    preset = given.get("preset", TrainConfig.preset)
    if preset not in TRAIN_PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
    recipe = given.get("recipe", TrainConfig.recipe)
    if recipe not in RECIPES:
        raise SystemExit(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    return TrainConfig(**{**TRAIN_PRESETS[preset], **RECIPES[recipe], **given})


def model_config(cfg: TrainConfig, vocab_size: int) -> M.ModelConfig:
    mcfg = M.model_config(cfg.preset, vocab_size=vocab_size, frontend=cfg.frontend, w2v_path=cfg.w2v_path,
                          dropout=cfg.dropout, attention_dropout=cfg.dropout, activation_dropout=cfg.dropout)
    mcfg.w2v.hidden_dropout = mcfg.w2v.attention_dropout = mcfg.w2v.feat_proj_dropout = cfg.dropout
    return mcfg


def inverse_sqrt(step: int, warmup: int) -> float:
    """Linear warm-up to 1, then 1/sqrt decay: the lr multiplier at `step` (fairseq's inverse_sqrt)."""
    step = max(step, 1)
    return min(step / warmup, math.sqrt(warmup / step))


class TextOnly(torch.utils.data.Dataset):
    """A split without its audio: the MT pre-training stage reads no wav."""

    def __init__(self, ds: data.MustcSplit):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return {"id": self.ds.segments[i].id, "audio": np.zeros(0, np.float32), "src": self.ds.src_ids[i],
                "tgt": self.ds.tgt_ids[i]}


def objective(cfg: TrainConfig, model: M.SpeechTranslator, batch: data.Batch, tasks: tuple) -> tuple:
    """ConST Eq. 1 as one weighted sum of summed losses, divided by the ST target tokens
    (METHODS §1.4). Returns (loss, dict of logged values per term, per token)."""
    raw = model.module if hasattr(model, "module") else model
    out = model(batch, tasks, reencode_asr=cfg.reencode_asr)
    n_tokens = batch.tgt_lens.sum()
    terms = {}
    for task in tasks:
        terms[task], _, _ = label_smoothed_cross_entropy(out.logits[task], out.targets[task], cfg.label_smoothing)
    if "st" in tasks and cfg.ctc_weight > 0:
        terms["ctc"] = ctc_loss(out.speech_low, out.speech_lens, raw.embed_tokens.weight, batch.src, batch.src_lens)
    if "st" in tasks and cfg.ctr_weight > 0:   # pooled speech of the ST pass vs a fresh embedding of the transcript
        text_low, text_lens = raw.encode_text(batch.src, batch.src_lens)
        terms["ctr"] = contrastive_loss(M.masked_mean(out.speech_low, out.speech_lens), M.masked_mean(text_low, text_lens),
                                        cfg.ctr_tau)
    weights = {"st": cfg.st_weight, "asr": cfg.asr_weight, "mt": cfg.mt_weight, "ctc": cfg.ctc_weight,
               "ctr": cfg.ctr_weight}
    loss = (
        weights["st"] * terms.get("st", 0.0)
        + weights["asr"] * terms.get("asr", 0.0)
        + weights["mt"] * terms.get("mt", 0.0)
        + weights["ctc"] * terms.get("ctc", 0.0)
        + weights["ctr"] * terms.get("ctr", 0.0)        # ConST: lambda * L_CTR
    ) / n_tokens
    return loss, {k: v.item() / n_tokens.item() for k, v in terms.items()}


def save_checkpoint(path: Path, state: dict):
    """Atomic: write a temporary file, then rename; a killed run never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "config", "model_config", "vocab", "step"):
        if key not in ckpt:
            raise KeyError(f"{path}: checkpoint has no {key!r}; was it written by this train.py?")
    return ckpt


def build_model(mcfg: dict) -> M.SpeechTranslator:
    w2v = M.Wav2Vec2Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in mcfg["w2v"].items()})
    return M.SpeechTranslator(M.ModelConfig(**{**mcfg, "w2v": w2v, "w2v_path": ""}))


def train(cfg: TrainConfig) -> dict:
    # -- distributed, device, precision, seeds
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if ddp:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    use_bf16 = {"true": True, "false": False}.get(cfg.bf16, device.type == "cuda" or (
        device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    main_proc = rank == 0
    say = print if main_proc else (lambda *a, **k: None)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)

    # -- data
    root = Path(cfg.data)
    if not (root / "data" / "train").exists():
        if cfg.data != TrainConfig.data:
            raise FileNotFoundError(f"{root}/data/train does not exist; point --data at an en-XX folder in MuST-C layout")
        if main_proc:
            say(f"building the demo corpus in {root.parent} (once)")
            data.write_demo_corpus(root.parent)
        if ddp:
            torch.distributed.barrier()
    vocab = data.build_vocab(root, cfg.vocab_size, verbose=main_proc)
    train_ds = data.MustcSplit(root, "train", vocab, max_frames=int(cfg.max_audio_seconds * data.SAMPLE_RATE),
                               verbose=main_proc)
    dev_ds = data.MustcSplit(root, "dev", vocab, verbose=main_proc)
    text_stage = cfg.stage == "mt"
    tasks = ("mt",) if text_stage else tuple(t for t in ("st", "asr", "mt") if getattr(cfg, f"{t}_weight") > 0)
    if text_stage:
        lengths = [max(len(s), len(t)) for s, t in zip(train_ds.src_ids, train_ds.tgt_ids)]
        sampler = data.BucketBatchSampler(lengths, cfg.batch_tokens, cfg.max_sentences, cfg.seed, rank=rank,
                                          world_size=world)
        dataset = TextOnly(train_ds)
    else:
        sampler = data.BucketBatchSampler([s.frames for s in train_ds.segments],
                                          int(cfg.batch_seconds * data.SAMPLE_RATE), cfg.max_sentences, cfg.seed,
                                          rank=rank, world_size=world)
        dataset = train_ds
    # the loader's own generator: creating an iterator must not draw from the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data.collate,
                                         num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed))

    # -- model and optimiser
    mcfg = model_config(cfg, len(vocab))
    model = M.SpeechTranslator(mcfg).to(device)
    if cfg.init_from:
        init = load_checkpoint(cfg.init_from)
        missing, unexpected = model.load_state_dict(init["model"], strict=False)
        if unexpected or any(not k.startswith(("wav2vec2.", "logmel.", "subsample.")) for k in missing):
            raise KeyError(f"{cfg.init_from}: weights do not fit this model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
        say(f"initialised from {cfg.init_from} (step {init['step']}); new: {sorted({k.split('.')[0] for k in missing})}")
    w2v_params = [p for n, p in model.named_parameters() if n.startswith("wav2vec2.")]
    other = [p for n, p in model.named_parameters() if not n.startswith("wav2vec2.")]
    optimizer = torch.optim.Adam([{"params": other, "lr": cfg.lr},
                                  {"params": w2v_params, "lr": cfg.lr * cfg.w2v_lr_scale}], betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: inverse_sqrt(s, cfg.warmup))
    step, best_bleu, bad_in_row, skipped = 0, -1.0, 0, 0
    if cfg.resume:
        ck = load_checkpoint(out_dir / "last.pt")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        sampler.load_state_dict(ck["sampler"])
        step, best_bleu, skipped = ck["step"], ck["best_bleu"], ck["skipped"]
        random.setstate(ck["rng"]["python"])
        torch.set_rng_state(ck["rng"]["torch"])
        if torch.cuda.is_available() and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
        say(f"resumed from {out_dir / 'last.pt'} at step {step}")
    # the MT stage leaves the speech path unused, and freezing wav2vec2 takes it out of the graph for a while
    unused = text_stage or cfg.freeze_w2v_steps > 0
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused) if ddp else model
    say("config: " + json.dumps(asdict(cfg)))
    say(f"model: {cfg.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"frontend {mcfg.frontend}, tasks {'+'.join(tasks)}, device {device}, bf16 {use_bf16}, world {world}")

    def checkpoint_state() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(), "step": step, "best_bleu": best_bleu, "skipped": skipped,
                "config": asdict(cfg), "model_config": asdict(mcfg), "vocab": str(vocab.path.resolve()),
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}

    # -- the loop
    from tqdm import tqdm
    log_file = open(out_dir / "log.jsonl", "a") if main_proc else None
    t_start, t_log, utts, losses_sum, n_log = time.time(), time.time(), 0, {}, 0
    batches = iter(loader)
    history = []
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not main_proc, desc=cfg.stage, dynamic_ncols=True)
    while step < cfg.max_steps:
        if cfg.max_minutes and time.time() - t_start > 60 * cfg.max_minutes:
            say(f"time budget of {cfg.max_minutes} min reached at step {step}")
            break
        if cfg.freeze_w2v_steps and mcfg.frontend == "wav2vec2":
            model.freeze_wav2vec2(step < cfg.freeze_w2v_steps)
        net.train()
        optimizer.zero_grad(set_to_none=True)
        step_terms, finite = {}, True
        for micro in range(cfg.accum):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, terms = objective(cfg, net, batch, tasks)
            finite = finite and bool(torch.isfinite(loss))
            (loss / cfg.accum).backward()
            sampler.advance()
            utts += len(batch)
            for k, v in terms.items():
                step_terms[k] = step_terms.get(k, 0.0) + v / cfg.accum
        if not finite:
            skipped, bad_in_row = skipped + 1, bad_in_row + 1
            say(f"step {step}: non-finite loss, update skipped ({skipped} so far)")
            if bad_in_row >= cfg.max_bad_steps:
                raise RuntimeError(f"{bad_in_row} non-finite losses in a row at step {step}: lower --lr, check the data "
                                   f"(python data.py stats) or switch --bf16=false")
            optimizer.zero_grad(set_to_none=True)
            continue
        bad_in_row = 0
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        history.append(step_terms)
        for k, v in step_terms.items():
            losses_sum[k] = losses_sum.get(k, 0.0) + v
        n_log += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            rate = utts * world / (time.time() - t_log)
            record = {"step": step, **{k: round(v / n_log, 4) for k, v in losses_sum.items()},
                      "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 3),
                      "utt_per_s": round(rate, 1), "minutes": round((time.time() - t_start) / 60, 2)}
            bar.write(" ".join(f"{k} {v}" for k, v in record.items())) if main_proc else None
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            t_log, utts, losses_sum, n_log = time.time(), 0, {}, 0
        if main_proc and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            import evaluate
            task = "mt" if text_stage else "st"
            dev = evaluate.bleu_on(model, dev_ds, vocab, task, beam=cfg.eval_beam, limit=cfg.eval_dev_max,
                                   device=device, bf16=use_bf16)
            bar.write(f"step {step}: dev {task.upper()} BLEU {dev:.2f}")
            if log_file:
                log_file.write(json.dumps({"step": step, f"dev_{task}_bleu": dev}) + "\n")
            if dev > best_bleu:
                best_bleu = dev
                save_checkpoint(out_dir / "best.pt", checkpoint_state())
            save_checkpoint(out_dir / "last.pt", checkpoint_state())
    bar.close()
    if main_proc:
        save_checkpoint(out_dir / "last.pt", checkpoint_state())
        if not (out_dir / "best.pt").exists():
            save_checkpoint(out_dir / "best.pt", checkpoint_state())
    if ddp:
        torch.distributed.destroy_process_group()
    return {"step": step, "history": history, "skipped": skipped, "minutes": (time.time() - t_start) / 60,
            "best": str(out_dir / "best.pt"), "last": str(out_dir / "last.pt")}


def main(argv: list):
    """No arguments: the main job. MT pre-training, then multitask training from it, then the
    tst-COMMON evaluation, all on the demo corpus and whatever device there is."""
    cfg = parse_config(argv)
    if argv:
        result = train(cfg)
        if cfg.final_eval and int(os.environ.get("RANK", 0)) == 0 and cfg.stage == "multitask":
            import evaluate
            evaluate.main(["--ckpt", result["last"], "--split", "tst-COMMON", "--beam", "5"])
        return result
    t0 = time.time()
    mt_dir = Path(cfg.out_dir) / "mt"
    if not (mt_dir / "last.pt").exists():
        train(dataclasses.replace(cfg, stage="mt", out_dir=str(mt_dir), max_steps=MAIN_JOB["mt_steps"],
                                  lr=MAIN_JOB["mt_lr"], warmup=MAIN_JOB["mt_warmup"], max_minutes=MAIN_JOB["mt_minutes"],
                                  eval_every=10**9, final_eval=False))
    result = train(dataclasses.replace(cfg, init_from=str(mt_dir / "last.pt"), eval_every=10**9,
                                       max_minutes=MAIN_JOB["minutes"]))
    import evaluate
    summary = evaluate.main(["--ckpt", result["last"], "--split", "tst-COMMON", "--beam", "5", "--quiet"])
    minutes = (time.time() - t0) / 60
    print(evaluate.results_table(summary, minutes))
    return summary


# The main job's MT stage, and wall-time guards that keep it within 20 minutes on a slower CPU
MAIN_JOB = {"mt_steps": 700, "mt_lr": 2e-3, "mt_warmup": 100, "mt_minutes": 5.5, "minutes": 11.5}


if __name__ == "__main__":
    main(sys.argv[1:])
