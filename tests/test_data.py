"""Tests of data.py: the MuST-C reader and its errors, vocabulary, batches, augmentations (the demo corpus: test_demo_corpus.py)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import demo_corpus

TINY = demo_corpus.DemoConfig(train=60, dev=10, test=10, talk_size=10, seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return demo_corpus.write_demo_corpus(tmp_path_factory.mktemp("demo"), TINY, verbose=False)


@pytest.fixture
def broken(corpus, tmp_path) -> Path:
    """A private copy of the tiny corpus that a test may break."""
    return Path(shutil.copytree(corpus, tmp_path / "en-de"))


def txt(root: Path, split="train", ext="yaml") -> Path:
    return root / "data" / split / "txt" / f"{split}.{ext}"


# ---------------------------------------------------------------------------------------- reader errors
def test_yaml_and_text_count_mismatch_names_both_files(broken):
    de = txt(broken, "train", "de")
    de.write_text("".join(de.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match=r"train\.yaml has 60 segments but .*train\.de has 59 lines"):
        data.MustcSplit(broken, "train", verbose=False)


def test_missing_wav_is_named(broken):
    (broken / "data" / "train" / "wav" / "demo_train_0002.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"entry 21: wav .*demo_train_0002\.wav is missing"):
        data.MustcSplit(broken, "train", verbose=False)


def test_unreadable_wav_is_named(broken):
    (broken / "data" / "train" / "wav" / "demo_train_0001.wav").write_bytes(b"not a wav file at all" * 10)
    with pytest.raises(ValueError, match=r"entry 11: cannot read wav .*demo_train_0001\.wav"):
        data.MustcSplit(broken, "train", verbose=False)


def test_segment_past_end_of_wav(broken):
    wav = broken / "data" / "train" / "wav" / "demo_train_0000.wav"
    x, sr = sf.read(str(wav), dtype="int16")
    sf.write(str(wav), x[: len(x) // 2], sr, subtype="PCM_16")
    with pytest.raises(ValueError, match=r"entry \d+: segment ends at .* but demo_train_0000\.wav has only"):
        data.MustcSplit(broken, "train", verbose=False)


def test_other_sample_rate_is_resampled_once(broken, capsys):
    a = data.MustcSplit(broken, "train", verbose=False).read_audio(0)
    wav = broken / "data" / "train" / "wav" / "demo_train_0000.wav"
    x, _ = sf.read(str(wav), dtype="float32")
    import soxr
    sf.write(str(wav), soxr.resample(x, 16000, 44100), 44100, subtype="FLOAT")
    d = data.MustcSplit(broken, "train")
    assert "44100 Hz; resampled once" in capsys.readouterr().out
    cached = broken / "data" / "train" / "wav16k" / "demo_train_0000.wav"
    assert cached.exists() and d.segments[0].wav == cached
    b = d.read_audio(0)
    assert len(a) == len(b) and np.corrcoef(a, b)[0, 1] > 0.99
    stamp = cached.stat().st_mtime_ns
    data.MustcSplit(broken, "train", verbose=False)
    assert cached.stat().st_mtime_ns == stamp      # not resampled a second time


def test_stereo_is_mixed_down(broken, capsys):
    ref = data.MustcSplit(broken, "train", verbose=False).read_audio(3)
    wav = broken / "data" / "train" / "wav" / "demo_train_0000.wav"
    x, sr = sf.read(str(wav), dtype="float32")
    sf.write(str(wav), np.stack([x, 0.5 * x], axis=1), sr, subtype="FLOAT")
    d = data.MustcSplit(broken, "train")
    assert "2 channels; mixing down" in capsys.readouterr().out
    np.testing.assert_allclose(d.read_audio(3), 0.75 * ref, atol=1e-6)


def test_empty_text_is_skipped_counted_and_pairing_kept(broken):
    lines = txt(broken, "train", "en").read_text().splitlines()
    lines[5] = "   "
    txt(broken, "train", "en").write_text("\n".join(lines) + "\n")
    d = data.MustcSplit(broken, "train", verbose=False)
    assert d.skipped["empty text"] == 1 and len(d) == 59
    de = txt(broken, "train", "de").read_text().splitlines()
    for s in d.segments:
        i = int(s.id.rsplit("_", 1)[1])
        assert (s.src, s.tgt) == (lines[i], de[i])


def test_text_that_is_not_utf8_names_file_and_line(broken):
    p = txt(broken, "train", "de")
    raw = p.read_bytes().split(b"\n")
    raw[2] = "Käse".encode("latin-1")
    p.write_bytes(b"\n".join(raw))
    with pytest.raises(ValueError, match=r"train\.de:3: not UTF-8"):
        data.MustcSplit(broken, "train", verbose=False)


def test_duration_filters_are_counted(broken):
    p = txt(broken, "train")
    lines = p.read_text().splitlines()
    lines[0] = lines[0].replace(lines[0].split("duration: ")[1].split(",")[0], "0.0500000")   # 800 samples
    p.write_text("\n".join(lines) + "\n")
    d = data.MustcSplit(broken, "train", verbose=False, max_frames=3 * 16000)
    long = sum(1 for line in lines[1:] if float(line.split("duration: ")[1].split(",")[0]) > 3)
    assert d.skipped == {"empty text": 0, "too short": 1, "too long": long} and len(d) == 59 - long
    assert data.MustcSplit(broken, "dev", verbose=False, max_frames=None).skipped["too long"] == 0


def test_yaml_written_by_a_yaml_library_is_read(broken):
    import yaml
    p = txt(broken, "train")
    entries = data._read_yaml(p)
    p.write_text(yaml.safe_dump([{k: (float(v) if k in ("offset", "duration") else v) for k, v in e.items()}
                                 for e in entries], default_flow_style=False))
    d = data.MustcSplit(broken, "train", verbose=False)
    assert len(d) == 60


def test_reading_a_segment_does_not_read_the_talk(tmp_path):
    """Memory must not grow with talk length: a 2 s segment at the end of a 20 min talk."""
    import tracemalloc
    root = tmp_path / "en-de"
    (root / "data" / "dev" / "wav").mkdir(parents=True)
    (root / "data" / "dev" / "txt").mkdir(parents=True)
    n = 20 * 60 * 16000
    with sf.SoundFile(str(root / "data" / "dev" / "wav" / "long.wav"), "w", 16000, 1, subtype="PCM_16") as f:
        for _ in range(20):
            f.write(np.full(60 * 16000, 0.1, np.float32))
    txt(root, "dev").write_text(f"- {{duration: 2.0, offset: {(n - 40000) / 16000}, speaker_id: a, wav: long.wav}}\n")
    txt(root, "dev", "en").write_text("a b c\n")
    txt(root, "dev", "de").write_text("x y z\n")
    d = data.MustcSplit(root, "dev", verbose=False)
    tracemalloc.start()
    x = d.read_audio(0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(x) == 32000 and np.allclose(x, 0.1, atol=1e-4)
    assert peak < 4 * x.nbytes            # the talk is 38 MB as int16; we hold about one segment


# ---------------------------------------------------------------------------------------- vocabulary
def test_vocabulary_layout_and_cache(broken):
    v = data.build_vocab(broken, 300, verbose=False)
    assert len(v) == 300
    assert [v.sp.id_to_piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert v.lang_id("en") == 4 and v.lang_id("de") == 5
    ids = v.encode_batch(["Der alte Mann liest ein Buch."], "de")[0]
    assert ids[0] == 5 and ids[-1] == data.EOS_ID
    assert v.decode(ids) == "Der alte Mann liest ein Buch."
    assert v.decode(ids + [7, 8]) == "Der alte Mann liest ein Buch."      # stops at </s>
    model = broken / "spm_unigram300.model"
    stamp = model.stat().st_mtime_ns
    data.build_vocab(broken, 300, verbose=False)
    assert model.stat().st_mtime_ns == stamp                              # cached
    p = txt(broken, "train", "en")
    p.write_text(p.read_text().replace("The", "Thee"))
    data.build_vocab(broken, 300, verbose=False)
    assert model.stat().st_mtime_ns != stamp                              # retrained: the data changed
    with pytest.raises(KeyError, match="lang:fr"):
        v.lang_id("fr")


def test_vocabulary_does_not_depend_on_the_cpus(corpus, tmp_path):
    """The main job must print the same numbers on any machine: SentencePiece's pieces change with its
    thread count, so the vocabulary is trained with one thread whatever the process may use."""
    pieces = []
    for cpus in ({0}, set(range(os.cpu_count() or 1)) | {1}):
        root = Path(shutil.copytree(corpus, tmp_path / f"cpus{len(cpus)}" / "en-de"))
        code = (f"import os, data; os.sched_setaffinity(0, {sorted(cpus)} if {len(cpus)} == 1 else os.sched_getaffinity(0)); "
                f"v = data.build_vocab({str(root)!r}, 300, verbose=False); "
                f"print('|'.join(v.sp.id_to_piece(i) for i in range(len(v))))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=Path(data.__file__).parent).stdout
        pieces.append(out)
    assert pieces[0] == pieces[1] and len(pieces[0].split("|")) == 300


# ---------------------------------------------------------------------------------------- batches
def test_collate_pads_and_keeps_lengths(corpus):
    v = data.build_vocab(corpus, 300, verbose=False)
    d = data.MustcSplit(corpus, "dev", v, verbose=False)
    b = data.collate([d[0], d[1], d[2]])
    assert b.audio.dtype == torch.float32 and b.audio.shape == (3, max(len(d[i]["audio"]) for i in range(3)))
    for i in range(3):
        n = int(b.audio_lens[i])
        assert torch.equal(b.audio[i, :n], torch.from_numpy(d[i]["audio"])) and (b.audio[i, n:] == 0).all()
        assert b.src[i, 0] == v.lang_id("en") and b.tgt[i, 0] == v.lang_id("de")
        assert (b.src[i, b.src_lens[i]:] == data.PAD_ID).all() and b.src[i, b.src_lens[i] - 1] == data.EOS_ID
    assert data.lengths_to_padding_mask(torch.tensor([2, 4])).tolist() == [[False, False, True, True], [False] * 4]


def test_sampler_covers_each_segment_once_within_bounds():
    lengths = np.random.default_rng(0).integers(1000, 100_000, 500)
    s = data.BucketBatchSampler(lengths, max_tokens=400_000, max_sentences=16, seed=3)
    for epoch in range(2):
        batches = s.batches(epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(500))
        for b in batches:
            assert len(b) <= 16 and (len(b) == 1 or len(b) * max(lengths[b]) <= 400_000)
    assert s.batches(0) != s.batches(1)                                 # reshuffled per epoch
    assert data.BucketBatchSampler(lengths, 400_000, 16, seed=3).batches(1) == s.batches(1)


def test_ddp_shards_are_disjoint_and_cover():
    lengths = np.random.default_rng(1).integers(1000, 50_000, 333)
    shards = [data.BucketBatchSampler(lengths, 300_000, 8, seed=5, rank=r, world_size=3).batches(4) for r in range(3)]
    flat = [set(i for b in sh for i in b) for sh in shards]
    assert not (flat[0] & flat[1]) and not (flat[0] & flat[2]) and not (flat[1] & flat[2])
    assert set().union(*flat) == set(range(333))


def test_sampler_state_round_trips():
    lengths = np.random.default_rng(2).integers(1000, 50_000, 200)
    a = data.BucketBatchSampler(lengths, 200_000, 8, seed=9)
    seen = []
    for _ in range(2):                       # run past one epoch boundary
        for batch in a:
            seen.append(batch)
            a.advance()
            if len(seen) == len(a.batches(0)) + 3:
                break
    state = a.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3
    b = data.BucketBatchSampler(lengths, 200_000, 8, seed=9)
    b.load_state_dict(state)
    assert list(b) == list(a) == a.batches(1)[3:]
    with pytest.raises(ValueError, match="seed"):
        data.BucketBatchSampler(lengths, 200_000, 8, seed=1).load_state_dict(state)


def test_loader_with_workers_yields_batches(corpus):
    v = data.build_vocab(corpus, 300, verbose=False)
    d = data.MustcSplit(corpus, "train", v, verbose=False)
    s = data.BucketBatchSampler([seg.frames for seg in d.segments], 20 * 16000, 8, seed=0)
    ids = [i for b in data.make_loader(d, s, num_workers=2) for i in b.ids]
    assert sorted(ids) == sorted(seg.id for seg in d.segments)


# ---------------------------------------------------------------------------------------- augmentations
def test_span_mask_properties():
    g = torch.Generator().manual_seed(0)
    T, M = 1_000_000, 3600
    audio = torch.rand(2, T, generator=g) + 0.5           # no natural zeros
    lens = torch.tensor([T, T // 2])
    masked, mask = data.span_mask_audio(audio, lens, p=0.25, span=M, generator=g)
    frac = mask[0].float().mean().item()
    assert 0.15 <= frac <= 0.25
    assert not mask[1, T // 2:].any()                    # padding never masked
    assert (masked[mask] == 0).all() and torch.equal(masked[~mask], audio[~mask])
    for row, n in ((0, T), (1, T // 2)):
        m = mask[row, :n].int()
        edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int32), m, torch.zeros(1, dtype=torch.int32)]))
        starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
        assert len(starts) >= 2 and ((ends - starts) >= M).all()
    short = data.span_mask_audio(audio[:, :1000], torch.tensor([1000, 500]), span=M)[1]
    assert not short.any()


def test_word_repetition_properties():
    g = torch.Generator().manual_seed(0)
    special = {4, 2, data.PAD_ID}
    tokens = torch.tensor([4, 10, 11, 12, 13, 14, 2])
    lengths = []
    for _ in range(2000):
        out, counts = data.repeat_words(tokens, special, g)
        assert counts[0] == 1 and counts[-1] == 1 and (counts >= 1).all()
        assert (out == 4).sum() == 1 and (out == 2).sum() == 1 and out[0] == 4 and out[-1] == 2
        # collapsing each run by the recorded counts gives the input back, in order
        assert torch.equal(torch.stack([chunk[0] for chunk in out.split(counts.tolist())]), tokens)
        assert all((chunk == chunk[0]).all() for chunk in out.split(counts.tolist()))
        lengths.append(len(out) - 2)
    assert abs(np.mean(lengths) / 5 - 2.0) < 0.05           # Poisson(1) + 1 copies on average
    padded, lens = data.repeat_words_batch(torch.tensor([[4, 10, 2, 1], [4, 11, 12, 2]]), torch.tensor([3, 4]),
                                           special, g)
    assert padded.shape[0] == 2 and (padded[0, lens[0]:] == data.PAD_ID).all()


# ---------------------------------------------------------------------------------------- command line
def test_command_line_stats(corpus):
    out = subprocess.run([sys.executable, "data.py", "stats", "--data", str(corpus), "--vocab_size", "200"],
                         capture_output=True, text=True, check=True, cwd=Path(data.__file__).parent).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.split()[0] in data.SPLITS}
    assert rows["train"][1] == "60" and rows["dev"][1] == "10" and rows["tst-COMMON"][1] == "10"
