"""The demo corpus generator (demo_corpus.py): MuST-C layout, speech, determinism, the German grammar."""
import filecmp
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import data
import demo_corpus
from demo_corpus import NP, Clause

TINY = demo_corpus.DemoConfig(train=60, dev=10, test=10, talk_size=10, seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return demo_corpus.write_demo_corpus(tmp_path_factory.mktemp("demo"), TINY, verbose=False)


def txt(root: Path, split="train", ext="yaml") -> Path:
    return root / "data" / split / "txt" / f"{split}.{ext}"


# ---------------------------------------------------------------------------------------- layout
def test_demo_writes_mustc_layout(corpus):
    for split, n in (("train", 60), ("dev", 10), ("tst-COMMON", 10)):
        yaml_lines = txt(corpus, split).read_text().splitlines()
        assert len(yaml_lines) == n
        assert len(txt(corpus, split, "en").read_text().splitlines()) == n
        assert len(txt(corpus, split, "de").read_text().splitlines()) == n
        assert all(line.startswith("- {duration: ") and "offset: " in line and "speaker_id: " in line
                   and "wav: " in line for line in yaml_lines)
        for e in data._read_yaml(txt(corpus, split)):      # offsets are whole samples: exact
            for key in ("offset", "duration"):
                x = float(e[key]) * 16000
                assert abs(x - round(x)) < 1e-6
        wavs = {line.split("wav: ")[1].rstrip("}") for line in yaml_lines}
        assert len(wavs) == n // TINY.talk_size          # one wav per talk
        for w in wavs:
            info = sf.info(str(corpus / "data" / split / "wav" / w))
            assert (info.samplerate, info.channels) == (16000, 1)


def test_segments_are_exact_and_one_speaker_per_talk(corpus):
    d = data.MustcSplit(corpus, "train", verbose=False)
    assert len(d) == 60
    by_wav = {}
    for s in d.segments:
        by_wav.setdefault(s.wav, []).append(s)
    for wav, segs in by_wav.items():
        assert len({s.speaker for s in segs}) == 1
        full, _ = sf.read(str(wav), dtype="float32")
        for a, b in zip(segs, segs[1:]):
            assert a.offset + a.frames < b.offset            # separated by silence, no overlap
        for s in segs:
            assert np.array_equal(d.read_audio(d.segments.index(s)), full[s.offset:s.offset + s.frames])
    # the speech is in the segment, the silence between segments: energy says so
    s = d.segments[1]
    full, _ = sf.read(str(s.wav), dtype="float32")
    gap = full[d.segments[0].offset + d.segments[0].frames:s.offset]
    assert np.sqrt((d.read_audio(1) ** 2).mean()) > 5 * np.sqrt((gap ** 2).mean())


def test_talks_use_distinct_voices():
    # every talk draws a voice; the voices must really sound different (eSpeak accepts unknown variants silently)
    tts = demo_corpus.Espeak()
    outs = {}
    for v in ["en-us", "en-gb-x-rp", "en-us+f2", "en-029+m3", "en-gb-scotland", "en-us-nyc+klatt", "en+Alex", "en+f4"]:
        tts.set_voice(v, 175, 50)
        outs[v] = tts.speak("The old man reads a new book.")
    spectra = {v: np.abs(np.fft.rfft(x.astype(np.float32)[:16000]))[:4000] for v, x in outs.items()}
    names = list(spectra)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = spectra[names[i]], spectra[names[j]]
            assert np.corrcoef(a, b)[0, 1] < 0.98, (names[i], names[j])
    assert len(demo_corpus.VOICES) * len(demo_corpus.VARIANTS) >= 8
    with pytest.raises(ValueError, match="no voice"):
        tts.set_voice("en-xx-nonexistent", 175, 50)


def test_demo_is_deterministic(corpus, tmp_path):
    again = demo_corpus.write_demo_corpus(tmp_path / "again", TINY, verbose=False)
    for split in data.SPLITS:
        for ext in ("yaml", "en", "de"):
            assert txt(corpus, split, ext).read_bytes() == txt(again, split, ext).read_bytes()
        for wav in (corpus / "data" / split / "wav").iterdir():
            assert filecmp.cmp(wav, again / "data" / split / "wav" / wav.name, shallow=False), wav.name
    other = demo_corpus.write_demo_corpus(tmp_path / "other", demo_corpus.DemoConfig(**{**TINY.__dict__, "seed": 8}), verbose=False)
    assert txt(other, "train", "en").read_bytes() != txt(corpus, "train", "en").read_bytes()


def test_dev_and_test_sentences_are_not_in_train(corpus):
    train = set(txt(corpus, "train", "en").read_text().splitlines())
    train_de = set(txt(corpus, "train", "de").read_text().splitlines())
    for split in ("dev", "tst-COMMON"):
        assert not train & set(txt(corpus, split, "en").read_text().splitlines())
        assert not train_de & set(txt(corpus, split, "de").read_text().splitlines())


# ---------------------------------------------------------------------------------------- text
def test_text_generator_coverage():
    pairs = demo_corpus.generate_text(4000, seed=3)
    assert len({en for en, _ in pairs}) == 4000
    lengths = [len(en.split()) for en, _ in pairs]
    assert min(lengths) >= 3 and max(lengths) <= 20
    types = {w.strip(".,?").lower() for en, _ in pairs for w in en.split()}
    assert len(types) >= 400
    de = " ".join(d for _, d in pairs)
    for marker in (", dass ", ", weil ", ", wenn ", "Wenn ", " kein", " nicht", "?", " im ", " zum ", " zur "):
        assert marker in de, marker
    # the same seed gives the same text
    assert demo_corpus.generate_text(50, seed=3) == pairs[:50]


# Hand-written reference translations. Each checks one piece of German grammar.
REFERENCE = [
    # gender and case of articles, adjective endings after der (weak) / ein (mixed) / none (strong)
    (("main", Clause(NP("man", "the", "old"), "read", acc=NP("book", "a", "new"))),
     "The old man reads a new book.", "Der alte Mann liest ein neues Buch."),
    (("main", Clause(NP("woman", "a", "young"), "see", acc=NP("dog", "the", "black"))),
     "A young woman sees the black dog.", "Eine junge Frau sieht den schwarzen Hund."),
    (("main", Clause(NP("child", "my"), "drink", acc=NP("milk", "bare", "cold"))),
     "My child drinks cold milk.", "Mein Kind trinkt kalte Milch."),
    (("main", Clause(NP("cat", "bare", "hungry", plural=True), "eat", acc=NP("sausage", "bare", "fresh", True))),
     "Hungry cats eat fresh sausages.", "Hungrige Katzen essen frische Würste."),
    # dative object, dative plural -n, ditransitive order
    (("main", Clause(NP("teacher", "the"), "give", dat=NP("child", "the", "small", True), acc=NP("apple", "a", "red"))),
     "The teacher gives the small children a red apple.", "Der Lehrer gibt den kleinen Kindern einen roten Apfel."),
    (("main", Clause(NP("girl", "the"), "help", dat=NP("man", "a", "old"))),
     "The girl helps an old man.", "Das Mädchen hilft einem alten Mann."),
    (("main", Clause(NP("dog", "the", plural=True), "follow", dat=NP("woman", "every"))),
     "The dogs follow every woman.", "Die Hunde folgen jeder Frau."),
    # prepositions with dative and accusative, contractions
    (("main", Clause(NP("child", "the"), "play", pp=("in the garden", "im Garten"))),
     "The child plays in the garden.", "Das Kind spielt im Garten."),
    # verb agreement with pronouns and stem changes
    (("main", Clause(NP(pron="you"), "read", acc=NP("letter", "the"))), "You read the letter.", "Du liest den Brief."),
    (("main", Clause(NP(pron="I"), "read", acc=NP("letter", "the"))), "I read the letter.", "Ich lese den Brief."),
    (("main", Clause(NP(pron="he"), "see", acc=NP(pron="she"))), "He sees her.", "Er sieht sie."),
    (("main", Clause(NP(pron="we"), "work")), "We work.", "Wir arbeiten."),
    # modal + infinitive at the end; "does not have to" is "muss nicht", not "darf nicht"
    (("main", Clause(NP("baker", "the"), "sell", acc=NP("bread", "the"), mode="can")),
     "The baker can sell the bread.", "Der Bäcker kann das Brot verkaufen."),
    (("main", Clause(NP("child", "the", plural=True), "sleep", mode="must", neg=True)),
     "The children do not have to sleep.", "Die Kinder müssen nicht schlafen."),
    (("main", Clause(NP(pron="she"), "write", acc=NP("letter", "a"), mode="want")),
     "She wants to write a letter.", "Sie will einen Brief schreiben."),
    # perfect with haben / sein, participle at the end
    (("main", Clause(NP("doctor", "my"), "buy", acc=NP("car", "a", "new"), mode="perfect")),
     "My doctor has bought a new car.", "Mein Arzt hat ein neues Auto gekauft."),
    (("main", Clause(NP("friend", "our", plural=True), "go", pp=("to the station", "zum Bahnhof"), mode="perfect")),
     "Our friends have gone to the station.", "Unsere Freunde sind zum Bahnhof gegangen."),
    # negation: kein for indefinite objects, nicht after definite ones
    (("main", Clause(NP("man", "the"), "read", acc=NP("book", "a"), neg=True)),
     "The man does not read a book.", "Der Mann liest kein Buch."),
    (("main", Clause(NP("man", "the"), "read", acc=NP("book", "the"), neg=True)),
     "The man does not read the book.", "Der Mann liest das Buch nicht."),
    (("main", Clause(NP("woman", "the"), "drink", acc=NP("coffee", "bare"), neg=True, mode="perfect")),
     "The woman has not drunk coffee.", "Die Frau hat keinen Kaffee getrunken."),
    (("main", Clause(NP("house", "this"), "be", adj="big", neg=True)), "This house is not big.",
     "Dieses Haus ist nicht groß."),
    # questions
    (("question", Clause(NP("cat", "the"), "sleep"), None, None, None, "yn"), "Does the cat sleep?", "Schläft die Katze?"),
    (("question", Clause(NP("man", "the"), "read", acc=NP("book", "a")), None, None, None, "what"),
     "What does the man read?", "Was liest der Mann?"),
    (("question", Clause(NP("child", "the"), "swim", mode="can"), None, None, None, "where"),
     "Where can the child swim?", "Wo kann das Kind schwimmen?"),
    (("question", Clause(NP("man", "the"), "eat", acc=NP("apple", "the"), mode="perfect"), None, None, None, "who"),
     "Who has eaten the apple?", "Wer hat den Apfel gegessen?"),
    # verb-final subordinate clauses; inversion after a fronted clause or adverb
    (("dass", Clause(NP("dog", "the"), "sleep"), None, (NP("teacher", "the"), "say")),
     "The teacher says that the dog sleeps.", "Der Lehrer sagt, dass der Hund schläft."),
    (("dass", Clause(NP("dog", "the"), "sleep"), None, (NP(pron="I"), "know")),
     "I know that the dog sleeps.", "Ich weiß, dass der Hund schläft."),
    (("weil", Clause(NP("child", "the"), "cry"), Clause(NP("dog", "the"), "eat", acc=NP("cake", "the"), mode="perfect")),
     "The child cries because the dog has eaten the cake.", "Das Kind weint, weil der Hund den Kuchen gegessen hat."),
    (("wenn_front", Clause(NP("child", "the", plural=True), "laugh"),
      Clause(NP("singer", "the"), "sing", mode="want")),
     "When the singer wants to sing, the children laugh.", "Wenn der Sänger singen will, lachen die Kinder."),
    (("main", Clause(NP("father", "my"), "visit", acc=NP("museum", "the")), None, None, "tomorrow"),
     "Tomorrow my father visits the museum.", "Morgen besucht mein Vater das Museum."),
]


@pytest.mark.parametrize("args,en,de", REFERENCE, ids=[r[1] for r in REFERENCE])
def test_german_reference_pairs(args, en, de):
    assert demo_corpus.sentence_pair(*args) == (en, de)


def test_prepositional_phrases_contract_and_take_their_case():
    rng = random.Random(0)
    seen = {kind: set() for kind in ("loc", "to", "from", "through", "with", "for")}
    for _ in range(400):
        for kind in seen:
            seen[kind].add(demo_corpus.random_pp(rng, kind)[1].split()[0])
    assert seen["to"] >= {"zum", "zur"} and seen["from"] >= {"vom", "von"}
    assert {"im", "am", "auf"} <= seen["loc"]
    assert seen["through"] == {"durch"} and seen["with"] == {"mit"} and seen["for"] == {"für"}
    # 'in dem' and 'zu der' never survive uncontracted after a definite article
    for _ in range(300):
        de = demo_corpus.random_pp(rng, rng.choice(["loc", "to", "from"]))[1]
        assert not de.startswith(("in dem ", "zu dem ", "zu der ", "an dem ", "von dem "))


# ---------------------------------------------------------------------------------------- command line
def test_command_line_demo(tmp_path):
    out = subprocess.run([sys.executable, "demo_corpus.py", "--out", str(tmp_path), "--train", "20", "--dev", "5",
                          "--test", "5", "--talk_size", "5"], capture_output=True, text=True, check=True,
                         cwd=Path(demo_corpus.__file__).parent).stdout
    assert "30 segments (train 20, dev 5, tst-COMMON 5)" in out and " h of speech" in out
    for split, n in (("train", 20), ("dev", 5), ("tst-COMMON", 5)):
        assert len(txt(tmp_path / "en-de", split, "en").read_text().splitlines()) == n
