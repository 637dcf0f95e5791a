"""data.py: bytes on disk -> tensors.

Read top to bottom (the demo corpus that it reads by default is written by demo_corpus.py):
  1. the MuST-C reader: YAML + text lines + lazily read wav segments, with clear errors
  2. the joint SentencePiece vocabulary with language tags
  3. Batch, collate, and the length-bucketed sampler (exact resume, DDP shards)
  4. input-side hard examples: span-masked audio and word repetition (ConST §3.3; docs/methods.md,
     "ConST: hard examples")
  5. the command line: `python data.py stats --data DIR`
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SAMPLE_RATE = 16_000
# fairseq's special-id layout, which ConST's vocabulary follows (docs/methods.md, "Data: MuST-C layout and vocabulary")
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
LANG_TAGS = ("<lang:en>", "<lang:de>")
SPLITS = ("train", "dev", "tst-COMMON")    # MuST-C's splits that every run needs (tst-HE is optional)


class UserError(Exception):
    """A mistake in the input or the command (a file, a line, a key, a flag), not a bug: the command
    lines print `error: <message>`, one line and no traceback; bugs keep their traceback."""


class BadInput(UserError, ValueError):
    """A file or value that is there but wrong (its message names the file, line or key)."""


class Missing(UserError, FileNotFoundError):
    """A file or folder that is not there."""


# ----------------------------------------------------------------------------------------------
# 1. The MuST-C reader
# ----------------------------------------------------------------------------------------------
MAX_TRAIN_FRAMES = 30 * SAMPLE_RATE    # ConST's prep drops train segments over 30 s ...
MIN_FRAMES = 1000                      # ... and every segment under 1000 samples
_YAML_LINE = re.compile(r"^-\s*\{(.*)\}\s*$")


def _read_yaml(path: Path) -> list:
    """MuST-C's YAML is one flow mapping per line; parse that fast, fall back to a YAML parser."""
    entries = []
    for line in _read_lines(path):
        m = _YAML_LINE.match(line)
        if not m:
            if line.strip():
                break
            continue
        entry = {}
        for item in m.group(1).split(","):
            key, _, value = item.partition(":")
            entry[key.strip()] = value.strip()
        entries.append(entry)
    else:
        return entries
    import yaml
    loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(loaded, list):
        raise BadInput(f"{path}: expected a YAML list of segments (- {{duration, offset, speaker_id, wav}})")
    return loaded


def _read_lines(path: Path) -> list:
    """Text lines of a file; bytes that are not UTF-8 are an error naming file and line."""
    if not path.exists():
        raise Missing(f"{path} is missing; a MuST-C split needs <split>.yaml, <split>.en and <split>.<tgt>")
    raw = path.read_bytes().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines = []
    for lineno, b in enumerate(raw, 1):
        try:
            lines.append(b.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise BadInput(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
    return lines


def _resample_file(src: Path, dst: Path, block: int = 1 << 18):
    """Resample a whole talk to 16 kHz mono once, streaming in blocks (a talk is never held whole)."""
    import soxr
    tmp = dst.with_suffix(".tmp.wav")
    with sf.SoundFile(src) as f, sf.SoundFile(tmp, "w", SAMPLE_RATE, 1, subtype="FLOAT") as g:
        stream = soxr.ResampleStream(f.samplerate, SAMPLE_RATE, 1, dtype="float32")
        while True:
            x = f.read(block, dtype="float32", always_2d=True).mean(axis=1)
            last = len(x) < block
            g.write(stream.resample_chunk(x, last=last))
            if last:
                break
    os.replace(tmp, dst)


def target_language(root: str | Path) -> str:
    """A MuST-C folder's target language: `.../en-de` -> "de"."""
    return Path(root).name.split("-")[-1]


@dataclass
class Segment:
    id: str
    wav: Path
    offset: int         # first sample at 16 kHz
    frames: int         # length in samples at 16 kHz
    speaker: str
    src: str
    tgt: str


class MustcSplit(torch.utils.data.Dataset):
    """One split of a MuST-C-layout corpus (`root` = the `en-XX` folder); audio is read lazily.

    `dataset[i]` -> dict(id, audio float32 (S,), src ids, tgt ids); ids only when a vocab is given.
    """

    def __init__(self, root: str | Path, split: str, vocab: "Vocab | None" = None, max_frames: int | None = None,
                 verbose: bool = True):
        self.root, self.split, self.vocab = Path(root), split, vocab
        self.tgt_lang = target_language(self.root)
        txt = self.root / "data" / split / "txt"
        yaml_path, en_path, tgt_path = txt / f"{split}.yaml", txt / f"{split}.en", txt / f"{split}.{self.tgt_lang}"
        entries = _read_yaml(yaml_path)
        src, tgt = _read_lines(en_path), _read_lines(tgt_path)
        for path, lines in ((en_path, src), (tgt_path, tgt)):
            if len(lines) != len(entries):
                raise BadInput(f"{yaml_path} has {len(entries)} segments but {path} has {len(lines)} lines; "
                                 "they must pair one to one (re-extract the split)")
        if max_frames is None:
            max_frames = MAX_TRAIN_FRAMES if split == "train" else 10**12
        self.skipped = {"empty text": 0, "too short": 0, "too long": 0}
        self.notes, infos, self.segments = [], {}, []
        for i, (e, s, t) in enumerate(zip(entries, src, tgt)):
            where = f"{yaml_path} entry {i + 1}"
            try:
                wav, offset, duration = e["wav"], float(e["offset"]), float(e["duration"])
            except (KeyError, ValueError, TypeError) as err:
                raise BadInput(f"{where}: needs numeric 'offset', 'duration' and a 'wav' name ({err!r})") from None
            if wav not in infos:
                infos[wav] = self._wav_info(self.root / "data" / split / "wav" / wav, where)
            path, total = infos[wav]
            first, frames = round(offset * SAMPLE_RATE), round(duration * SAMPLE_RATE)
            if first + frames > total + 16:   # 1 ms of slack for rounding of the YAML's seconds
                raise BadInput(f"{where}: segment ends at {offset + duration:.3f} s but {wav} has only "
                                 f"{total / SAMPLE_RATE:.3f} s; the YAML does not belong to this wav")
            frames = min(frames, total - first)
            if not s.strip() or not t.strip():
                self.skipped["empty text"] += 1
            elif frames < MIN_FRAMES:
                self.skipped["too short"] += 1
            elif frames > max_frames:
                self.skipped["too long"] += 1
            else:
                self.segments.append(Segment(f"{Path(wav).stem}_{i}", path, first, frames,
                                             str(e.get("speaker_id", "")), s.strip(), t.strip()))
        self.src_ids = self.tgt_ids = None
        if vocab is not None:
            self.src_ids = vocab.encode_batch([s.src for s in self.segments], "en")
            self.tgt_ids = vocab.encode_batch([s.tgt for s in self.segments], self.tgt_lang)
        if verbose:
            skipped = ", ".join(f"{v} {k}" for k, v in self.skipped.items() if v) or "none"
            print(f"{self.root.name}/{split}: {len(self.segments)} segments, {self.hours:.2f} h; skipped: {skipped}")
            for note in self.notes:
                print(f"  note: {note}")

    def _wav_info(self, path: Path, where: str) -> tuple:
        """(path to read at 16 kHz, length in samples); resamples once if the file is not 16 kHz."""
        if not path.exists():
            raise Missing(f"{where}: wav {path} is missing")
        try:
            info = sf.info(str(path))
        except Exception as err:  # soundfile raises its own error types for corrupt headers
            raise BadInput(f"{where}: cannot read wav {path} ({err}); replace the file") from None
        if info.channels > 1:
            self.notes.append(f"{path.name} has {info.channels} channels; mixing down to mono when reading")
        if info.samplerate != SAMPLE_RATE:
            cached = path.parent.parent / "wav16k" / path.name
            if not cached.exists() or cached.stat().st_mtime < path.stat().st_mtime:
                cached.parent.mkdir(exist_ok=True)
                _resample_file(path, cached)
            self.notes.append(f"{path.name} is {info.samplerate} Hz; resampled once to 16 kHz in {cached}")
            return cached, sf.info(str(cached)).frames
        return path, info.frames

    @property
    def hours(self) -> float:
        return sum(s.frames for s in self.segments) / SAMPLE_RATE / 3600

    def __len__(self) -> int:
        return len(self.segments)

    def read_audio(self, i: int) -> np.ndarray:
        """The segment's samples, float32 in [-1, 1], unnormalised; only the segment is read."""
        s = self.segments[i]
        with sf.SoundFile(str(s.wav)) as f:
            f.seek(s.offset)
            x = f.read(s.frames, dtype="float32", always_2d=True)
        if len(x) != s.frames:
            raise BadInput(f"{s.wav}: expected {s.frames} samples at {s.offset} for segment {s.id}, got "
                             f"{len(x)}; the wav is truncated")
        return x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]

    def __getitem__(self, i: int) -> dict:
        item = {"id": self.segments[i].id, "audio": self.read_audio(i)}
        if self.src_ids is not None:
            item["src"], item["tgt"] = self.src_ids[i], self.tgt_ids[i]
        return item


# ----------------------------------------------------------------------------------------------
# 2. The joint SentencePiece vocabulary: one dictionary for every text side
# ----------------------------------------------------------------------------------------------
class Vocab:
    """SentencePiece model with fairseq's special ids and `<lang:xx>` tags as whole pieces."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm
        self.path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.tags = {p[6:-1]: i for i in range(len(self)) if (p := self.sp.id_to_piece(i)).startswith("<lang:")}
        assert (self.sp.bos_id(), self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()) == (BOS_ID, PAD_ID, EOS_ID, UNK_ID)

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def lang_id(self, lang: str) -> int:
        if lang not in self.tags:
            raise KeyError(f"{self.path} has no tag <lang:{lang}>; it knows {sorted(self.tags)}")
        return self.tags[lang]

    def encode_batch(self, texts: list, lang: str) -> list:
        """`<lang:xx> pieces </s>` for every text (ConST's source and target layout)."""
        tag = self.lang_id(lang)
        return [[tag] + ids + [EOS_ID] for ids in self.sp.encode(list(texts))]

    def decode(self, ids) -> str:
        """Text from ids; special ids and language tags are dropped, decoding stops at </s>."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        if EOS_ID in ids:
            ids = ids[:ids.index(EOS_ID)]
        drop = {BOS_ID, PAD_ID, *self.tags.values()}
        return self.sp.decode([i for i in ids if i not in drop])


def build_vocab(root: str | Path, size: int = 10_000, verbose: bool = True) -> Vocab:
    """Train (or reuse) the joint unigram model over train transcripts + translations.

    Cached as `root/spm_unigram<size>.model`; a fingerprint of the training text beside it
    triggers retraining when the data changes.
    """
    import sentencepiece as spm
    root = Path(root)
    tgt = target_language(root)
    txt = root / "data" / "train" / "txt"
    lines = _read_lines(txt / "train.en") + _read_lines(txt / f"train.{tgt}")
    # the trainer's pieces depend on its thread count: one thread, on every machine (0.2-0.4 s here)
    digest = hashlib.sha256(("\n".join(lines) + "\n#spm unigram, 1 thread").encode()).hexdigest()
    model, meta = root / f"spm_unigram{size}.model", root / f"spm_unigram{size}.json"
    if model.exists() and meta.exists() and json.loads(meta.read_text()).get("sha256") == digest:
        return Vocab(model)
    t0, prefix = time.time(), root / f".spm_unigram{size}.tmp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s for s in lines if s.strip()]), model_prefix=str(prefix), vocab_size=size,
        model_type="unigram", character_coverage=1.0, bos_id=BOS_ID, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        user_defined_symbols=["<lang:en>", f"<lang:{tgt}>"], input_sentence_size=2_000_000,
        shuffle_input_sentence=True, num_threads=1, minloglevel=2,
        hard_vocab_limit=False)     # a soft limit: a small corpus gets the pieces it can support, with a note
    os.replace(f"{prefix}.model", model)
    os.remove(f"{prefix}.vocab")
    meta.write_text(json.dumps({"sha256": digest, "size": size}))
    vocab = Vocab(model)
    if verbose:
        print(f"vocabulary: trained {model.name} ({len(vocab)} pieces) in {time.time() - t0:.1f} s")
    if len(vocab) < size:
        print(f"note: the training text of {root} supports only {len(vocab)} pieces, not the {size} asked for; "
              f"using {len(vocab)} (set --vocab_size={len(vocab)} or less to silence this)")
    return vocab


# ----------------------------------------------------------------------------------------------
# 3. Batches and the length-bucketed sampler
# ----------------------------------------------------------------------------------------------
def lengths_to_padding_mask(lens: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool mask, True on padding (the convention everywhere here)."""
    max_len = int(lens.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lens.device)[None, :] >= lens[:, None]


def pad_sequences(seqs: list, value) -> tuple:
    """List of 1-D sequences -> ((B, L) padded tensor, (B,) lengths)."""
    seqs = [s if torch.is_tensor(s) else torch.as_tensor(s, device="cpu") for s in seqs]   # lists, arrays: host
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=seqs[0].device if seqs else "cpu")
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value), lens


@dataclass
class Batch:
    """A padded batch. Shapes: audio (B, S) float in [-1, 1]; src (B, L) `<lang:en> x </s>`;
    tgt (B, L') `<lang:xx> y </s>`; padding is 0.0 for audio and PAD_ID for tokens."""
    ids: list
    audio: torch.Tensor
    audio_lens: torch.Tensor
    src: torch.Tensor
    src_lens: torch.Tensor
    tgt: torch.Tensor
    tgt_lens: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.ids, *(getattr(self, k).to(device, non_blocking=True) for k in
                                 ("audio", "audio_lens", "src", "src_lens", "tgt", "tgt_lens")))

    def __len__(self) -> int:
        return len(self.ids)


def collate(items: list) -> Batch:
    audio, audio_lens = pad_sequences([it["audio"] for it in items], 0.0)
    src, src_lens = pad_sequences([it["src"] for it in items], PAD_ID)
    tgt, tgt_lens = pad_sequences([it["tgt"] for it in items], PAD_ID)
    return Batch([it["id"] for it in items], audio, audio_lens, src, src_lens, tgt, tgt_lens)


class BucketBatchSampler:
    """Batches of similar length, bounded by padded size (`max_tokens`: samples of audio, or
    tokens of text) and by `max_sentences`; a new order each epoch from (seed, epoch).

    The batches of an epoch are a pure function of (lengths, bounds, seed, epoch, rank, world):
    that is what makes resume exact. The trainer calls `advance()` after every batch it
    consumed, so prefetching loader workers never move the saved position. Under DDP each rank
    takes every world-th batch: shards are disjoint and together cover the epoch.
    """

    def __init__(self, lengths, max_tokens: int, max_sentences: int = 10**9, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_tokens, self.max_sentences, self.seed, self.shuffle = max_tokens, max_sentences, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position, self._cache = 0, 0, (None, None)

    def batches(self, epoch: int) -> list:
        if self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        tie = rng.random(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        order = np.lexsort((tie, self.lengths))        # by length; random among equal lengths
        batches, cur = [], []
        for i in order.tolist():
            if cur and ((len(cur) + 1) * self.lengths[i] > self.max_tokens or len(cur) >= self.max_sentences):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        mine = batches[self.rank::self.world_size]
        self._cache = (epoch, mine)
        return mine

    def __iter__(self):
        yield from self.batches(self.epoch)[self.position:]

    def __len__(self) -> int:
        return len(self.batches(self.epoch)) - self.position

    def advance(self):
        self.position += 1
        if self.position >= len(self.batches(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict):
        if state["seed"] != self.seed:
            raise BadInput(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]


def make_loader(dataset: MustcSplit, sampler: BucketBatchSampler, num_workers: int = 1) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None)


# ----------------------------------------------------------------------------------------------
# 4. Input-side hard examples (ConST §3.3)
# ----------------------------------------------------------------------------------------------
def span_mask_audio(audio: torch.Tensor, lens: torch.Tensor, p: float = 0.25, span: int = 3600, min_masks: int = 2,
                    generator: torch.Generator | None = None) -> tuple:
    """Span-Masked Augmentation (SMA): zero `int(p*T/span + U(0,1))` (at least `min_masks`)
    spans of `span` samples at uniform random starts in each utterance, as fairseq's
    `compute_mask_indices` with static lengths. Overlapping spans merge, so the masked fraction
    is a little under p. Padding is never masked; utterances shorter than one span are left
    whole. Unlike fairseq we do not trim every row to the batch's smallest masked count (that
    cuts spans shorter than `span`).

    audio (B, S), lens (B,) -> (masked audio (B, S), mask (B, S) bool, True where zeroed).
    """
    mask = torch.zeros_like(audio, dtype=torch.bool)
    for b, T in enumerate(lens.tolist()):
        if T < span:
            continue
        # the spans are drawn on the host (the CPU's RNG on every device), the mask applied where the audio is
        n = max(min_masks, int(p * T / span + torch.rand((), generator=generator, device="cpu").item()))
        n = min(n, T - span + 1)
        starts = torch.randperm(T - span + 1, generator=generator, device="cpu")[:n]
        edges = torch.zeros(T + 1, dtype=torch.int32, device="cpu")
        edges.index_add_(0, starts, torch.ones(n, dtype=torch.int32, device="cpu"))
        edges.index_add_(0, starts + span, -torch.ones(n, dtype=torch.int32, device="cpu"))
        mask[b, :T] = (edges.cumsum(0)[:T] > 0).to(audio.device)
    return audio.masked_fill(mask, 0.0), mask


def repeat_words(tokens: torch.Tensor, special: set, generator: torch.Generator | None = None) -> tuple:
    """Word repetition (Rep): every sub-word is repeated Poisson(1) extra times; ids in `special`
    (language tags, </s>, padding) stay single. tokens (L,) -> (repeated (L',), counts (L,))."""
    counts = 1 + torch.poisson(torch.ones(len(tokens), device="cpu"), generator=generator).long()   # host RNG
    is_special = torch.tensor([int(t) in special for t in tokens.tolist()], dtype=torch.bool, device="cpu")
    counts[is_special] = 1
    counts = counts.to(tokens.device)
    return tokens.repeat_interleave(counts), counts


def repeat_words_batch(src: torch.Tensor, src_lens: torch.Tensor, special: set,
                       generator: torch.Generator | None = None) -> tuple:
    """`repeat_words` on every row of a padded batch -> (padded (B, L'), lengths (B,))."""
    rows = [repeat_words(src[b, :n], special, generator)[0] for b, n in enumerate(src_lens.tolist())]
    return pad_sequences(rows, PAD_ID)


# ----------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------
def print_stats(root: str | Path, vocab_size: int = 10_000):
    root = Path(root)
    vocab = build_vocab(root, vocab_size)
    splits = [s for s in (*SPLITS, "tst-HE") if (root / "data" / s).exists()]
    print(f"{'split':<12}{'segments':>10}{'hours':>8}{'src tokens':>12}{'tgt tokens':>12}   skipped")
    for split in splits:
        d = MustcSplit(root, split, vocab, verbose=False)
        skipped = ", ".join(f"{v} {k}" for k, v in d.skipped.items() if v) or "-"
        print(f"{split:<12}{len(d):>10}{d.hours:>8.2f}{sum(map(len, d.src_ids)):>12}{sum(map(len, d.tgt_ids)):>12}"
              f"   {skipped}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    stats = sub.add_parser("stats", help="segments, hours and tokens per split")
    stats.add_argument("--data", required=True, help="the en-XX folder")
    stats.add_argument("--vocab_size", type=int, default=10_000)
    a = p.parse_args(argv)
    print_stats(a.data, a.vocab_size)


if __name__ == "__main__":
    main()
