"""demo_corpus.py: the built-in demo corpus, English speech with German translations, in MuST-C layout.

    python demo_corpus.py --out demo_data [--train N --dev N --test N --seed S --talk_size N --noise X --workers N]

A dataset generator, like nanoGPT's data/*/prepare.py: it writes files and nothing imports it but
train.py (to build the corpus on first run), the tutorials and the tests. Read top to bottom:
  1. text: a seeded English grammar with its German translation
  2. speech: eSpeak NG through ctypes, one voice per talk
  3. the writer, in MuST-C v1.0 layout (docs/methods.md, "Data: MuST-C layout and vocabulary"), so that
     data.py's one reader serves demo and real data
  4. the command line
"""
from __future__ import annotations

import argparse
import ctypes
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf


@dataclass
class DemoConfig:
    train: int = 8000          # segments; what the CPU demo of train.py needs (README, "demo corpus")
    dev: int = 300
    test: int = 500
    seed: int = 1
    talk_size: int = 40        # segments per talk (one talk = one speaker)
    noise: float = 0.003       # std of background noise relative to full scale; 0 switches it off
    workers: int = 2           # generator processes (eSpeak keeps state: one fresh process per shard)


# ----------------------------------------------------------------------------------------------
# 1. Text: a seeded English grammar and its German translation
# ----------------------------------------------------------------------------------------------
# Nouns: English singular, plural ('-' = mass noun), German singular, plural, gender, class.
# Classes: P person, A animal, F food, D drink, T text, O object, L place. No weak masculine
# nouns (Student -> den Studenten) so that a noun never changes form except in the dative plural.
NOUNS = """
man men Mann Männer m P|woman women Frau Frauen f P|child children Kind Kinder n P
teacher teachers Lehrer Lehrer m P|doctor doctors Arzt Ärzte m P|girl girls Mädchen Mädchen n P
friend friends Freund Freunde m P|father fathers Vater Väter m P|mother mothers Mutter Mütter f P
brother brothers Bruder Brüder m P|sister sisters Schwester Schwestern f P|baker bakers Bäcker Bäcker m P
cook cooks Koch Köche m P|driver drivers Fahrer Fahrer m P|king kings König Könige m P
queen queens Königin Königinnen f P|singer singers Sänger Sänger m P|painter painters Maler Maler m P
writer writers Schriftsteller Schriftsteller m P|pupil pupils Schüler Schüler m P|uncle uncles Onkel Onkel m P
grandmother grandmothers Großmutter Großmütter f P|grandfather grandfathers Großvater Großväter m P
aunt aunts Tante Tanten f P|daughter daughters Tochter Töchter f P|son sons Sohn Söhne m P
guest guests Gast Gäste m P|waiter waiters Kellner Kellner m P|nurse nurses Krankenschwester Krankenschwestern f P
lawyer lawyers Anwalt Anwälte m P|thief thieves Dieb Diebe m P|dancer dancers Tänzer Tänzer m P
player players Spieler Spieler m P|baby babies Baby Babys n P|worker workers Arbeiter Arbeiter m P
engineer engineers Ingenieur Ingenieure m P|musician musicians Musiker Musiker m P|actor actors Schauspieler Schauspieler m P
fisherman fishermen Fischer Fischer m P|hunter hunters Jäger Jäger m P|lady ladies Dame Damen f P
dog dogs Hund Hunde m A|cat cats Katze Katzen f A|horse horses Pferd Pferde n A|cow cows Kuh Kühe f A
bird birds Vogel Vögel m A|mouse mice Maus Mäuse f A|pig pigs Schwein Schweine n A|sheep sheep Schaf Schafe n A
goat goats Ziege Ziegen f A|duck ducks Ente Enten f A|chicken chickens Huhn Hühner n A
rabbit rabbits Kaninchen Kaninchen n A|fox foxes Fuchs Füchse m A|wolf wolves Wolf Wölfe m A
tiger tigers Tiger Tiger m A|snake snakes Schlange Schlangen f A|frog frogs Frosch Frösche m A
donkey donkeys Esel Esel m A|spider spiders Spinne Spinnen f A|bee bees Biene Bienen f A|owl owls Eule Eulen f A
apple apples Apfel Äpfel m F|cake cakes Kuchen Kuchen m F|egg eggs Ei Eier n F|banana bananas Banane Bananen f F
pear pears Birne Birnen f F|sausage sausages Wurst Würste f F|pizza pizzas Pizza Pizzen f F
carrot carrots Karotte Karotten f F|potato potatoes Kartoffel Kartoffeln f F|tomato tomatoes Tomate Tomaten f F
cookie cookies Keks Kekse m F|orange oranges Orange Orangen f F|lemon lemons Zitrone Zitronen f F
cherry cherries Kirsche Kirschen f F|salad salads Salat Salate m F|bread - Brot - n F|soup - Suppe - f F
cheese - Käse - m F|rice - Reis - m F
water - Wasser - n D|coffee - Kaffee - m D|tea - Tee - m D|milk - Milch - f D|juice - Saft - m D
wine - Wein - m D|beer - Bier - n D|lemonade - Limonade - f D
book books Buch Bücher n T|letter letters Brief Briefe m T|newspaper newspapers Zeitung Zeitungen f T
story stories Geschichte Geschichten f T|poem poems Gedicht Gedichte n T|message messages Nachricht Nachrichten f T
magazine magazines Zeitschrift Zeitschriften f T|map maps Karte Karten f T|note notes Notiz Notizen f T
recipe recipes Rezept Rezepte n T|report reports Bericht Berichte m T|novel novels Roman Romane m T
list lists Liste Listen f T|song songs Lied Lieder n T
ball balls Ball Bälle m O|key keys Schlüssel Schlüssel m O|bag bags Tasche Taschen f O|cup cups Tasse Tassen f O
glass glasses Glas Gläser n O|bottle bottles Flasche Flaschen f O|chair chairs Stuhl Stühle m O
table tables Tisch Tische m O|lamp lamps Lampe Lampen f O|pen pens Stift Stifte m O|box boxes Kiste Kisten f O
hat hats Hut Hüte m O|shoe shoes Schuh Schuhe m O|coat coats Mantel Mäntel m O|dress dresses Kleid Kleider n O
umbrella umbrellas Regenschirm Regenschirme m O|clock clocks Uhr Uhren f O|picture pictures Bild Bilder n O
flower flowers Blume Blumen f O|gift gifts Geschenk Geschenke n O|ticket tickets Fahrkarte Fahrkarten f O
phone phones Telefon Telefone n O|computer computers Computer Computer m O|camera cameras Kamera Kameras f O
plate plates Teller Teller m O|knife knives Messer Messer n O|spoon spoons Löffel Löffel m O|fork forks Gabel Gabeln f O
bicycle bicycles Fahrrad Fahrräder n O|car cars Auto Autos n O|boat boats Boot Boote n O|door doors Tür Türen f O
window windows Fenster Fenster n O|bed beds Bett Betten n O|towel towels Handtuch Handtücher n O
shirt shirts Hemd Hemden n O|ring rings Ring Ringe m O|candle candles Kerze Kerzen f O|basket baskets Korb Körbe m O
stone stones Stein Steine m O|guitar guitars Gitarre Gitarren f O|toy toys Spielzeug Spielzeuge n O
garden gardens Garten Gärten m L|kitchen kitchens Küche Küchen f L|park parks Park Parks m L
station stations Bahnhof Bahnhöfe m L|school schools Schule Schulen f L|beach beaches Strand Strände m L
office offices Büro Büros n L|library libraries Bibliothek Bibliotheken f L|city cities Stadt Städte f L
forest forests Wald Wälder m L|river rivers Fluss Flüsse m L|lake lakes See Seen m L|market markets Markt Märkte m L
street streets Straße Straßen f L|bridge bridges Brücke Brücken f L|hotel hotels Hotel Hotels n L
restaurant restaurants Restaurant Restaurants n L|church churches Kirche Kirchen f L
hospital hospitals Krankenhaus Krankenhäuser n L|museum museums Museum Museen n L|shop shops Laden Läden m L
village villages Dorf Dörfer n L|house houses Haus Häuser n L|room rooms Zimmer Zimmer n L
castle castles Schloss Schlösser n L|zoo zoos Zoo Zoos m L|airport airports Flughafen Flughäfen m L
cinema cinemas Kino Kinos n L|theatre theatres Theater Theater n L|bakery bakeries Bäckerei Bäckereien f L
mountain mountains Berg Berge m L|island islands Insel Inseln f L|farm farms Bauernhof Bauernhöfe m L
"""
# Where a thing is: English and German preposition of location for each place (dative in German).
PLACE_PREP = {"station": ("at", "an"), "school": ("at", "in"), "beach": ("on", "an"), "river": ("by", "an"),
              "lake": ("by", "an"), "market": ("at", "auf"), "street": ("on", "auf"), "bridge": ("on", "auf"),
              "airport": ("at", "an"), "mountain": ("on", "auf"), "island": ("on", "auf"), "farm": ("on", "auf")}
# Adjectives: English, German predicative form, German stem for endings, classes it fits.
ADJECTIVES = """
old alt alt PAOTL|young jung jung PA|big groß groß AOL|small klein klein PAOFL|new neu neu OTL
red rot rot OF|blue blau blau O|green grün grün OF|black schwarz schwarz AO|white weiß weiß AO
yellow gelb gelb OF|brown braun braun AO|beautiful schön schön POL|ugly hässlich hässlich AOL
happy glücklich glücklich PA|sad traurig traurig PA|tired müde müd PA|hungry hungrig hungrig PA
thirsty durstig durstig PA|friendly freundlich freundlich PA|nice nett nett P|clever klug klug PA
funny lustig lustig PAT|quiet ruhig ruhig PAL|loud laut laut PAL|fast schnell schnell PAO
slow langsam langsam PAO|strong stark stark PAD|weak schwach schwach PD|rich reich reich P|poor arm arm P
famous berühmt berühmt PTL|long lang lang OT|short kurz kurz OT|heavy schwer schwer O
cheap billig billig OFDT|expensive teuer teur OFDL|clean sauber sauber OL|dirty schmutzig schmutzig AOL
warm warm warm DOL|cold kalt kalt FDL|hot heiß heiß FD|fresh frisch frisch FD|sweet süß süß FD
sour sauer saur FD|good gut gut FDT|bad schlecht schlecht FDT|strange seltsam seltsam PATL
dangerous gefährlich gefährlich AL|lazy faul faul PA|brave mutig mutig P|angry wütend wütend PA
sick krank krank PA|empty leer leer OL|full voll voll OL|round rund rund O|dark dunkel dunkl OL
interesting interessant interessant PTL|boring langweilig langweilig TL|wet nass nass AO|dry trocken trocken OD
soft weich weich OF|wild wild wild A|lonely einsam einsam PA|proud stolz stolz P|polite höflich höflich P
curious neugierig neugierig PA|little klein klein AO|wonderful wunderbar wunderbar TL
"""
# Verbs: English base, 3sg, past participle | German infinitive, du-form, er-form, participle,
# perfect auxiliary (h/s) | frame | subject classes | object classes.
# Frames: i intransitive, a accusative object, d dative object, da dative + accusative.
# A trailing '+word' on the English base is a particle that follows the verb ("look for").
VERBS = """
sleep sleeps slept|schlafen schläfst schläft geschlafen h|i|PA|
run runs run|laufen läufst läuft gelaufen s|i|PA|
come comes come|kommen kommst kommt gekommen s|i|PA|
go goes gone|gehen gehst geht gegangen s|i|PA|
work works worked|arbeiten arbeitest arbeitet gearbeitet h|i|P|
wait waits waited|warten wartest wartet gewartet h|i|PA|
laugh laughs laughed|lachen lachst lacht gelacht h|i|P|
sing sings sung|singen singst singt gesungen h|i|P|
swim swims swum|schwimmen schwimmst schwimmt geschwommen s|i|PA|
dance dances danced|tanzen tanzt tanzt getanzt h|i|P|
cry cries cried|weinen weinst weint geweint h|i|P|
travel travels travelled|reisen reist reist gereist s|i|P|
live lives lived|wohnen wohnst wohnt gewohnt h|i|PA|
play plays played|spielen spielst spielt gespielt h|i|PA|
sit sits sat|sitzen sitzt sitzt gesessen h|i|PA|
jump jumps jumped|springen springst springt gesprungen s|i|PA|
stay stays stayed|bleiben bleibst bleibt geblieben s|i|PA|
drive drives driven|fahren fährst fährt gefahren s|i|P|
fly flies flown|fliegen fliegst fliegt geflogen s|i|PA|
read reads read|lesen liest liest gelesen h|a|P|T
write writes written|schreiben schreibst schreibt geschrieben h|a|P|T
eat eats eaten|essen isst isst gegessen h|a|PA|F
drink drinks drunk|trinken trinkst trinkt getrunken h|a|PA|D
cook cooks cooked|kochen kochst kocht gekocht h|a|P|F
buy buys bought|kaufen kaufst kauft gekauft h|a|P|FDOT
sell sells sold|verkaufen verkaufst verkauft verkauft h|a|P|FDOT
see sees seen|sehen siehst sieht gesehen h|a|PA|PAOTL
find finds found|finden findest findet gefunden h|a|PA|PAOT
carry carries carried|tragen trägst trägt getragen h|a|P|O
open opens opened|öffnen öffnest öffnet geöffnet h|a|P|O
wash washes washed|waschen wäschst wäscht gewaschen h|a|P|AO
paint paints painted|malen malst malt gemalt h|a|P|PAOL
draw draws drawn|zeichnen zeichnest zeichnet gezeichnet h|a|P|PAO
love loves loved|lieben liebst liebt geliebt h|a|PA|PA
visit visits visited|besuchen besuchst besucht besucht h|a|P|PL
need needs needed|brauchen brauchst braucht gebraucht h|a|PA|FDOT
hold holds held|halten hältst hält gehalten h|a|P|AO
catch catches caught|fangen fängst fängt gefangen h|a|PA|AO
take takes taken|nehmen nimmst nimmt genommen h|a|P|FOT
bring brings brought|bringen bringst bringt gebracht h|a|P|FDOT
look+for looks+for looked+for|suchen suchst sucht gesucht h|a|PA|PAOT
hear hears heard|hören hörst hört gehört h|a|PA|PA
know knows known|kennen kennst kennt gekannt h|a|P|PL
forget forgets forgotten|vergessen vergisst vergisst vergessen h|a|P|OT
clean cleans cleaned|putzen putzt putzt geputzt h|a|P|OL
repair repairs repaired|reparieren reparierst repariert repariert h|a|P|O
order orders ordered|bestellen bestellst bestellt bestellt h|a|P|FD
lose loses lost|verlieren verlierst verliert verloren h|a|P|O
understand understands understood|verstehen verstehst versteht verstanden h|a|P|PT
build builds built|bauen baust baut gebaut h|a|P|OL
help helps helped|helfen hilfst hilft geholfen h|d|P|P
thank thanks thanked|danken dankst dankt gedankt h|d|P|P
follow follows followed|folgen folgst folgt gefolgt s|d|PA|PA
answer answers answered|antworten antwortest antwortet geantwortet h|d|P|P
give gives given|geben gibst gibt gegeben h|da|P|FDOT
show shows shown|zeigen zeigst zeigt gezeigt h|da|P|AOT
send sends sent|schicken schickst schickt geschickt h|da|P|OT
"""
# Where the object of a transitive verb may be a person pronoun (him, her, ...).
MODALS = {  # English (affirmative, negated, question-auxiliary form) -> German forms per person
    "can": ("können", "kann kannst kann können können"),
    "must": ("müssen", "muss musst muss müssen müssen"),
    "want": ("wollen", "will willst will wollen wollen"),
    "should": ("sollen", "soll sollst soll sollen sollen"),
}
AUX = {"haben": "habe hast hat haben haben", "sein": "bin bist ist sind sind"}
# subject pronouns: English, German, person index (0 ich, 1 du, 2 er/sie, 3 wir, 4 sie pl), object forms
PRONOUNS = {"I": ("ich", 0), "you": ("du", 1), "he": ("er", 2), "she": ("sie", 2), "we": ("wir", 3),
            "they": ("sie", 4)}
OBJ_PRONOUNS = {"I": ("me", "mich", "mir"), "you": ("you", "dich", "dir"), "he": ("him", "ihn", "ihm"),
                "she": ("her", "sie", "ihr"), "we": ("us", "uns", "uns"), "they": ("them", "sie", "ihnen")}
# Determiners: English (sg, pl), German stem, kind. Kinds: def (der), dies (dieser-type), ein
# (ein-words: ein, kein, mein ...), none (bare noun, strong adjective), num (uninflected numeral).
DETERMINERS = {
    "the": (("the", "the"), "d", "def"), "a": (("a", None), "ein", "ein"),
    "this": (("this", "these"), "dies", "dies"), "every": (("every", None), "jed", "dies"),
    "my": (("my", "my"), "mein", "ein"), "your": (("your", "your"), "dein", "ein"),
    "his": (("his", "his"), "sein", "ein"), "her": (("her", "her"), "ihr", "ein"),
    "our": (("our", "our"), "unser", "ein"), "their": (("their", "their"), "ihr", "ein"),
    "bare": ((None, None), "", "none"), "two": ((None, "two"), "zwei", "num"),
    "three": ((None, "three"), "drei", "num"), "four": ((None, "four"), "vier", "num"),
    "many": ((None, "many"), "viel", "none"), "some": ((None, "some"), "einig", "none"),
}
TIME_ADVERBS = {"today": "heute", "tomorrow": "morgen", "now": "jetzt"}
FREQ_ADVERBS = {"often": "oft", "always": "immer", "sometimes": "manchmal"}
SAY_VERBS = {"say": ("says", "sage sagst sagt sagen sagen"), "think": ("thinks", "glaube glaubst glaubt glauben glauben"),
             "know": ("knows", "weiß weißt weiß wissen wissen"), "hope": ("hopes", "hoffe hoffst hofft hoffen hoffen")}
WH_WORDS = {"where": "wo", "why": "warum", "when": "wann"}
CASES = ("nom", "acc", "dat")
# German inflection tables, indexed [case][gender] with genders m, f, n, pl.
_G = {"m": 0, "f": 1, "n": 2, "pl": 3}
DER = {"nom": "der die das die", "acc": "den die das die", "dat": "dem der dem den"}
DIES_END = {"nom": "er e es e", "acc": "en e es e", "dat": "em er em en"}   # dieser, jeder; strong adjectives
EIN_END = {"nom": "_ e _ e", "acc": "en e _ e", "dat": "em er em en"}       # ein, kein, mein ('_' = none)
WEAK_ADJ = {"nom": "e e e en", "acc": "en e e en", "dat": "en en en en"}    # after der / dieser
MIXED_ADJ = {"nom": "er e es en", "acc": "en e es en", "dat": "en en en en"}  # after ein-words
STRONG_ADJ = DIES_END                                                        # no inflected determiner


def _pick(table: dict, case: str, gender: str) -> str:
    s = table[case].split()[_G[gender]]
    return "" if s == "_" else s


@dataclass
class Noun:
    en: str
    en_pl: str | None
    de: str
    de_pl: str | None
    gender: str
    cls: str


@dataclass
class Verb:
    en: tuple          # base, 3sg, past participle (with '+particle')
    de: str            # infinitive
    du: str
    er: str
    part: str
    aux: str           # haben | sein
    frame: str         # i, a, d, da
    subj: str
    obj: str


def _parse_lexicon():
    nouns = {}
    for entry in NOUNS.replace("\n", "|").split("|"):
        if entry.strip():
            en, en_pl, de, de_pl, g, c = entry.split()
            nouns[en] = Noun(en, None if en_pl == "-" else en_pl, de, None if de_pl == "-" else de_pl, g, c)
    adjs = {}
    for entry in ADJECTIVES.replace("\n", "|").split("|"):
        if entry.strip():
            en, pred, stem, cls = entry.split()
            adjs[en] = (pred, stem, cls)
    verbs = {}
    for line in VERBS.strip().splitlines():
        en, de, frame, subj, obj = line.split("|")
        inf, du, er, part, aux = de.split()
        key = en.split()[0].split("+")[0]
        verbs[key] = Verb(tuple(en.split()), inf, du, er, part, {"h": "haben", "s": "sein"}[aux], frame, subj, obj)
    return nouns, adjs, verbs


LEX_NOUNS, LEX_ADJS, LEX_VERBS = _parse_lexicon()


@dataclass
class NP:
    """A noun phrase: a noun with determiner, optional adjective, number; or a pronoun."""
    noun: str | None = None
    det: str = "the"
    adj: str | None = None
    plural: bool = False
    pron: str | None = None     # key of PRONOUNS when the phrase is a pronoun

    @property
    def person(self) -> int:
        if self.pron:
            return PRONOUNS[self.pron][1]
        return 4 if self.plural else 2


def np_en(np_: NP, case: str = "nom") -> str:
    if np_.pron:
        return np_.pron if case == "nom" else OBJ_PRONOUNS[np_.pron][0]
    n = LEX_NOUNS[np_.noun]
    det = DETERMINERS[np_.det][0][1 if np_.plural else 0]
    words = [w for w in (det, np_.adj, n.en_pl if np_.plural else n.en) if w]
    if det == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def np_de(np_: NP, case: str = "nom", negate: bool = False) -> str:
    """German noun phrase in `case`; `negate` turns an indefinite phrase into its kein-form."""
    if np_.pron:
        de, _ = PRONOUNS[np_.pron]
        return de if case == "nom" else OBJ_PRONOUNS[np_.pron][1 if case == "acc" else 2]
    n = LEX_NOUNS[np_.noun]
    g = "pl" if np_.plural else n.gender
    _, stem, kind = DETERMINERS[np_.det]
    if negate:      # ein Buch -> kein Buch; Bücher -> keine Bücher; Milch -> keine Milch
        assert kind in ("ein", "none") and stem in ("ein", ""), "only indefinite phrases take kein"
        stem, kind = "kein", "ein"
    if kind == "def":
        det, adj_table = DER[case].split()[_G[g]], WEAK_ADJ
    elif kind == "dies":
        det, adj_table = stem + _pick(DIES_END, case, g), WEAK_ADJ
    elif kind == "ein":
        det, adj_table = stem + _pick(EIN_END, case, g), MIXED_ADJ
    elif kind == "num":
        det, adj_table = stem, STRONG_ADJ
    else:           # bare nouns, viele, einige: the adjective carries the strong ending
        det, adj_table = (stem + _pick(STRONG_ADJ, case, g)) if stem else "", STRONG_ADJ
    noun = n.de_pl if np_.plural else n.de
    if case == "dat" and np_.plural and noun[-1] not in "ns":
        noun += "n"  # dative plural: den Hunden, but den Autos, den Frauen
    adj = LEX_ADJS[np_.adj][1] + _pick(adj_table, case, g) if np_.adj else ""
    return " ".join(w for w in (det, adj, noun) if w)


def _indefinite(np_: NP | None) -> bool:
    return np_ is not None and not np_.pron and np_.det in ("a", "bare")


@dataclass
class Clause:
    """One clause: subject, verb (or 'be' + adjective), objects, prepositional phrase, and form.

    mode: 'present' | 'perfect' | a key of MODALS. pp: (English, German) already rendered.
    """
    subj: NP
    verb: str                   # key of LEX_VERBS, or 'be'
    acc: NP | None = None
    dat: NP | None = None
    adj: str | None = None      # predicative adjective when verb == 'be'
    pp: tuple | None = None
    mode: str = "present"
    neg: bool = False
    adv: str | None = None      # frequency adverb (often, always, sometimes)


def _en_verb_group(c: Clause, he: bool, question: bool) -> tuple:
    """(auxiliary, words after it): a statement reads subj aux words, a question aux subj words."""
    if c.verb == "be":
        base = third = "be"
        part = "been"
    else:
        base, third, part = [s.replace("+", " ") for s in LEX_VERBS[c.verb].en]
    does, has = ("does", "has") if he else ("do", "have")
    nt = ["not"] if c.neg else []
    if c.mode == "perfect":
        return has, nt + [part]
    if c.mode == "can":
        return ("cannot" if c.neg else "can"), [base]
    if c.mode == "should":
        return "should", nt + [base]
    if c.mode in ("want", "must"):
        to = {"want": "want to", "must": "have to"}[c.mode]
        if question or c.neg:
            return does, nt + [to, base]
        return (None, [("wants to" if he else "want to"), base]) if c.mode == "want" else ("must", [base])
    if c.verb == "be":
        return {0: "am", 2: "is"}.get(c.subj.person, "are"), nt
    if question or c.neg:
        return does, nt + [base]
    return None, ([c.adv] if c.adv else []) + [third if he else base]


def clause_en(c: Clause, question: str | None = None) -> str:
    """English clause. question: None (statement), 'yn', 'what' (object asked), 'who' (subject
    asked, third person singular), or a key of WH_WORDS."""
    he = c.subj.person == 2 or question == "who"
    aux, words = _en_verb_group(c, he, question not in (None, "who"))
    rest = [np_en(x, "acc") for x in (c.dat, c.acc) if x is not None and not (question == "what" and x is c.acc)]
    rest += ([c.adj] if c.adj else []) + ([c.pp[0]] if c.pp else [])
    if question in (None, "who"):
        subj = "who" if question == "who" else np_en(c.subj)
        return " ".join([subj] + ([aux] if aux else []) + words + rest)
    return " ".join(([] if question == "yn" else [question]) + [aux, np_en(c.subj)] + words + rest)


def _de_verb(c: Clause) -> tuple:
    """German (finite verb, non-finite verbs at the end) for the clause's subject."""
    p = c.subj.person
    if c.verb == "be":
        inf, forms, part, aux = "sein", AUX["sein"].split(), "gewesen", "sein"
    else:
        v = LEX_VERBS[c.verb]
        stem = v.de[:-2]
        inf, forms, part, aux = v.de, [stem + "e", v.du, v.er, v.de, v.de], v.part, v.aux
    if c.mode == "perfect":
        return AUX[aux].split()[p], [part]
    if c.mode in MODALS:
        return MODALS[c.mode][1].split()[p], [inf]
    return forms[p], []


def clause_de(c: Clause, order: str = "v2", front: str | None = None, question: str | None = None) -> str:
    """German clause. order: 'v2' (statement; `front` is a fronted adverbial), 'v1' (yes/no
    question, or main clause after a fronted wenn-clause), 'final' (subordinate clause).
    question: 'what' | 'who' | key of WH_WORDS puts the wh-word first (V2)."""
    if question == "yn":
        order, question = "v1", None
    finite, right = _de_verb(c)
    # kein replaces nicht when the focused object is indefinite (liest kein Buch / hilft keinem Mann)
    focus = c.acc if c.acc is not None else c.dat
    kein = c.neg and _indefinite(focus) and c.verb != "be"
    pron = [np_de(x, case) for x, case in ((c.dat, "dat"), (c.acc, "acc")) if x is not None and x.pron]
    nps = [np_de(x, case, negate=kein and x is focus) for x, case in ((c.dat, "dat"), (c.acc, "acc"))
           if x is not None and not x.pron and not (question == "what" and x is c.acc)]
    middle = pron + ([FREQ_ADVERBS[c.adv]] if c.adv else []) + nps
    middle += (["nicht"] if c.neg and not kein else []) + ([LEX_ADJS[c.adj][0]] if c.adj else [])
    middle += [c.pp[1]] if c.pp else []
    subj = "wer" if question == "who" else np_de(c.subj)
    if question == "who":
        words = [subj, finite] + middle + right
    elif question:
        wh = "was" if question == "what" else WH_WORDS[question]
        words = [wh, finite, subj] + middle + right
    elif order == "final":
        words = [subj] + middle + right + [finite]
    elif order == "v1":
        words = [finite, subj] + middle + right
    elif front:
        words = [front, finite, subj] + middle + right
    else:
        words = [subj, finite] + middle + right
    return " ".join(words)


# The sentence generator: draws clauses the lexicon allows and combines them into sentences.
MOTION_VERBS = {"run", "come", "go", "swim", "travel", "drive", "fly"}
FOR_VERBS = {"buy", "bring", "cook", "paint", "draw", "write", "order", "build", "repair"}
THROUGH_PLACES = ("park", "forest", "city", "village", "garden", "street")
_CONTRACT = {("in", "dem"): "im", ("an", "dem"): "am", ("zu", "dem"): "zum", ("zu", "der"): "zur",
             ("von", "dem"): "vom"}


def _nouns_of(classes: str) -> list:
    return [k for k, n in LEX_NOUNS.items() if n.cls in classes]


def random_np(rng: random.Random, classes: str, case: str = "nom", pronoun_p: float = 0.0,
              avoid_pron: str | None = None) -> NP:
    if "P" in classes and rng.random() < pronoun_p:
        choices = [p for p in PRONOUNS if p != avoid_pron]
        return NP(pron=rng.choice(choices))
    noun = LEX_NOUNS[rng.choice(_nouns_of(classes))]
    plural = noun.en_pl is not None and rng.random() < 0.3
    if plural:
        det = rng.choices(["the", "bare", "my", "your", "his", "her", "our", "their", "this", "two", "three",
                           "four", "many", "some"], [30, 18, 5, 3, 3, 3, 3, 3, 9, 5, 3, 2, 4, 4])[0]
    elif noun.en_pl is None:    # mass noun
        det = rng.choices(["the", "bare", "my", "your", "his", "her", "this"], [40, 35, 5, 5, 5, 5, 5])[0]
    else:
        det = rng.choices(["the", "a", "my", "your", "his", "her", "our", "their", "this", "every"],
                          [38, 25, 6, 4, 5, 5, 3, 3, 7, 4])[0]
    adjs = [a for a, (_, _, cls) in LEX_ADJS.items() if noun.cls in cls]
    adj = rng.choice(adjs) if adjs and rng.random() < 0.35 else None
    return NP(noun.en, det, adj, plural)


def random_pp(rng: random.Random, kind: str) -> tuple:
    """(English, German) prepositional phrase. kind: loc, to, from, through, with, for."""
    if kind == "loc":
        np_ = random_np(rng, "L")
        en_p, de_p = PLACE_PREP.get(np_.noun, ("in", "in"))
        case = "dat"
    elif kind in ("to", "from"):
        np_ = random_np(rng, "LP" if kind == "to" else "L")
        en_p, de_p, case = kind, {"to": "zu", "from": "von"}[kind], "dat"
    elif kind == "through":
        np_ = random_np(rng, "L")
        np_.noun = rng.choice(THROUGH_PLACES)
        en_p, de_p, case = "through", "durch", "acc"
    elif kind == "with":
        np_, en_p, de_p, case = random_np(rng, "PA"), "with", "mit", "dat"
    else:
        np_, en_p, de_p, case = random_np(rng, "P"), "for", "für", "acc"
    de = np_de(np_, case)
    det, _, rest = de.partition(" ")
    if (de_p, det) in _CONTRACT and np_.det == "the":
        return f"{en_p} {np_en(np_, 'acc')}", f"{_CONTRACT[de_p, det]} {rest}"
    return f"{en_p} {np_en(np_, 'acc')}", f"{de_p} {de}"


def random_clause(rng: random.Random, neg_p: float = 0.25, adv_p: float = 0.1, question: str | None = None) -> Clause:
    if rng.random() < 0.1 and question not in ("what",):
        subj = random_np(rng, rng.choice("PPAOLTF"), pronoun_p=0.2 if question != "who" else 0)
        cls = "P" if subj.pron else LEX_NOUNS[subj.noun].cls
        adj = rng.choice([a for a, (_, _, c) in LEX_ADJS.items() if cls in c])
        mode = rng.choices(["present", "perfect", "can", "must", "should"], [70, 10, 8, 6, 6])[0]
        return Clause(subj, "be", adj=adj, mode=mode, neg=rng.random() < neg_p)
    verbs = [k for k, v in LEX_VERBS.items() if question != "what" or (v.frame in ("a", "da") and v.obj != "P")]
    verb = LEX_VERBS[rng.choice(verbs)]
    subj = random_np(rng, rng.choice(verb.subj + "P"), pronoun_p=0.2 if question != "who" else 0)
    if question == "who" and (subj.plural or subj.pron):
        subj = NP(subj.noun or "man", "the")
    c = Clause(subj, next(k for k, v in LEX_VERBS.items() if v is verb))
    obj_classes = verb.obj.replace("P", "") if question == "what" else verb.obj
    if "a" in verb.frame:
        c.acc = random_np(rng, rng.choice(obj_classes), "acc", 0.25 if verb.frame == "a" else 0, subj.pron)
    if "d" in verb.frame:
        c.dat = random_np(rng, "P", "dat", 0.3, subj.pron)
    c.mode = rng.choices(["present", "perfect", "can", "must", "want", "should"], [50, 20, 9, 7, 8, 6])[0]
    kinds = (["to", "to", "from", "through", "loc"] if c.verb in MOTION_VERBS else ["loc", "loc", "with"])
    if verb.frame != "i":
        kinds = ["loc"] + (["for"] if c.verb in FOR_VERBS else [])
    if question != "where" and rng.random() < (0.6 if verb.frame == "i" else 0.2):
        c.pp = random_pp(rng, rng.choice(kinds))
    focus = c.acc if c.acc is not None else c.dat
    c.neg = (question is None and rng.random() < neg_p and subj.det != "every"
             and (focus is None or focus.pron or focus.det in ("the", "a", "bare", "this", "my", "your", "his",
                                                                "her", "our", "their")))
    if question is None and c.mode == "present" and not c.neg and rng.random() < adv_p:
        c.adv = rng.choice(list(FREQ_ADVERBS))
    return c


def _sentence(words: str, end: str) -> str:
    return words[0].upper() + words[1:] + end


def sentence_pair(kind: str, c: Clause, sub: Clause | None = None, say: tuple | None = None,
                  time_adv: str | None = None, question: str | None = None) -> tuple:
    """Render one sentence in both languages. kind: 'main' (optionally with a fronted time
    adverb), 'question' ('yn', 'what', 'who' or a WH_WORDS key), 'dass' (`say` = (subject NP,
    SAY_VERBS key) introduces the clause `c`), 'weil' / 'wenn' (main clause `c`, subordinate
    `sub` after it), 'wenn_front' (subordinate `sub` first, then the main clause verb-first)."""
    if kind == "main" and time_adv:
        return (_sentence(f"{time_adv} {clause_en(c)}", "."),
                _sentence(clause_de(c, front=TIME_ADVERBS[time_adv]), "."))
    if kind == "main":
        return _sentence(clause_en(c), "."), _sentence(clause_de(c), ".")
    if kind == "question":
        return _sentence(clause_en(c, question), "?"), _sentence(clause_de(c, question=question), "?")
    if kind == "dass":
        subj, verb = say
        third, forms = SAY_VERBS[verb]
        return (_sentence(f"{np_en(subj)} {third if subj.person == 2 else verb} that {clause_en(c)}", "."),
                _sentence(f"{np_de(subj)} {forms.split()[subj.person]}, dass {clause_de(c, 'final')}", "."))
    if kind == "wenn_front":
        return (_sentence(f"when {clause_en(sub)}, {clause_en(c)}", "."),
                _sentence(f"wenn {clause_de(sub, 'final')}, {clause_de(c, 'v1')}", "."))
    conj_en, conj_de = {"weil": ("because", "weil"), "wenn": ("when", "wenn")}[kind]
    return (_sentence(f"{clause_en(c)} {conj_en} {clause_en(sub)}", "."),
            _sentence(f"{clause_de(c)}, {conj_de} {clause_de(sub, 'final')}", "."))


def generate_pair(rng: random.Random) -> tuple:
    """One (English, German) sentence pair, drawn over every construction of the demo corpus."""
    kind = rng.choices(["main", "yn", "wh", "dass", "weil", "wenn", "wenn_front"], [40, 10, 12, 10, 10, 9, 9])[0]
    if kind == "main":
        c = random_clause(rng)
        t = rng.choice(list(TIME_ADVERBS)) if rng.random() < 0.15 and c.adv is None else None
        return sentence_pair("main", c, time_adv=t)
    if kind in ("yn", "wh"):
        q = "yn" if kind == "yn" else rng.choice(["what", "what", "who", "where", "why", "when"])
        return sentence_pair("question", random_clause(rng, neg_p=0, adv_p=0, question=q), question=q)
    if kind == "dass":
        say = (random_np(rng, "P", pronoun_p=0.3), rng.choice(list(SAY_VERBS)))
        return sentence_pair("dass", random_clause(rng, adv_p=0), say=say)
    return sentence_pair(kind, random_clause(rng, adv_p=0), random_clause(rng, adv_p=0))


def generate_text(n: int, seed: int, min_words: int = 3, max_words: int = 20) -> list:
    """n distinct (English, German) pairs, deterministic in `seed`."""
    rng, seen, pairs = random.Random(seed), set(), []
    while len(pairs) < n:
        en, de = generate_pair(rng)
        if min_words <= len(en.split()) <= max_words and en not in seen and de not in seen:
            seen.update((en, de))
            pairs.append((en, de))
    return pairs


# ----------------------------------------------------------------------------------------------
# 2. Speech: English spoken by eSpeak NG (espeakng-loader wheel, driven through ctypes)
# ----------------------------------------------------------------------------------------------
VOICES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-us-nyc", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5",
            "+Alex", "+john", "+max", "+paul", "+steph", "+david", "+zac", "+linda", "+ed")


class Espeak:
    """eSpeak NG in synchronous mode: `speak(text)` -> int16 samples at `self.sample_rate` (22050 Hz).

    The library keeps state between calls, so the same call sequence is only reproducible in a
    fresh process: the corpus writer gives every shard of talks an interpreter of its own (speak_shards).
    """

    def __init__(self):
        import espeakng_loader
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.libc = ctypes.CDLL("libc.so.6")
        self._chunks = []
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = proto(self._collect)   # keep a reference: the library calls it later
        self.sample_rate = self.lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)  # 2 = synchronous
        if self.sample_rate <= 0:
            raise RuntimeError(f"eSpeak NG failed to initialise (code {self.sample_rate}); reinstall espeakng-loader")
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events):
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def set_voice(self, name: str, rate: int, pitch: int):
        if self.lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {name!r}; choose one of {VOICES}")
        self.lib.espeak_SetParameter(1, rate, 0)    # espeakRATE, words per minute
        self.lib.espeak_SetParameter(3, pitch, 0)   # espeakPITCH, 0-100

    def speak(self, text: str, seed: int = 0) -> np.ndarray:
        self._chunks.clear()
        self.libc.srand(seed)
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        data = text.encode() + b"\0"
        self.lib.espeak_Synth(data, len(data), 0, 0, 0, 1, None, None)  # 1 = espeakCHARS_UTF8
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def _synthesize_talks(job: tuple) -> list:
    """Worker: speak a shard of talks and write one wav per talk at `sample_rate`; returns YAML entries."""
    import soxr
    wav_dir, talks, noise, sample_rate = job
    tts, out = Espeak(), []
    for talk_id, voice, rate, pitch, seed, sentences in talks:
        rng = np.random.default_rng(seed)
        tts.set_voice(voice, rate, pitch)
        pieces, pos, entries = [np.zeros(int(rng.integers(4000, 12000)), np.float32)], 0, []
        pos = len(pieces[0])
        for i, text in enumerate(sentences):
            speech = soxr.resample(tts.speak(text, seed + i).astype(np.float32) / 32768, tts.sample_rate, sample_rate)
            entries.append({"duration": len(speech), "offset": pos, "speaker_id": f"spk_{talk_id}",
                            "wav": f"{talk_id}.wav"})
            gap = np.zeros(int(rng.integers(3200, 12800)), np.float32)   # 0.2-0.8 s of silence
            pieces += [speech, gap]
            pos += len(speech) + len(gap)
        audio = np.concatenate(pieces)
        if noise > 0:
            audio = audio + rng.normal(0, noise * rng.uniform(0.3, 1.0), len(audio)).astype(np.float32)
        sf.write(Path(wav_dir) / f"{talk_id}.wav", np.clip(audio, -1, 1), sample_rate, subtype="PCM_16")
        out.append(entries)
    return out


WORKER = ("import json, sys; sys.path.insert(0, sys.argv[1]); from demo_corpus import _synthesize_talks; "
          "print(json.dumps(_synthesize_talks(json.load(sys.stdin))))")


def speak_shards(jobs: list, workers: int, verbose: bool = False) -> list:
    """_synthesize_talks(job) for every job, each in a fresh interpreter (eSpeak keeps state, see Espeak),
    `workers` at a time; the results in job order. A job goes in as JSON on stdin, its result comes back
    as JSON on stdout.

    Not multiprocessing. A fork of this process copies every lock that one of its threads holds at that
    moment (torch's, tqdm's, a pool's own handler threads) into a child that can never release it: the test
    suite was seen to hang in Pool.__exit__ with a worker stuck in SemLock.__enter__. Its spawn and
    forkserver start methods re-run the caller's main script in every worker, and a tutorial is a script
    without a main guard. A subprocess execs a new interpreter at once, which is safe from a threaded
    process, and the interpreter imports this file only (no torch): about 0.3 s per shard of 5 talks."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm
    here = str(Path(__file__).resolve().parent)

    def speak(job):
        r = subprocess.run([sys.executable, "-c", WORKER, here], input=json.dumps(job), capture_output=True,
                           text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"the eSpeak worker failed (exit code {r.returncode}):\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.splitlines()[-1])
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(tqdm(pool.map(speak, jobs), total=len(jobs), desc="speaking", disable=not verbose))


# ----------------------------------------------------------------------------------------------
# 3. The demo corpus writer: MuST-C v1.0 layout, so that one reader serves demo and real data
# ----------------------------------------------------------------------------------------------
def _yaml_line(e: dict, sample_rate: int) -> str:
    # offsets and durations are whole samples at 16 kHz, exact in 7 decimals
    return (f"- {{duration: {e['duration'] / sample_rate:.7f}, offset: {e['offset'] / sample_rate:.7f}, "
            f"speaker_id: {e['speaker_id']}, wav: {e['wav']}}}\n")


def write_demo_corpus(out: str | Path, cfg: DemoConfig = DemoConfig(), verbose: bool = True) -> Path:
    """Write `out/en-de/data/{train,dev,tst-COMMON}/{wav,txt}` and return `out/en-de`."""
    from data import SAMPLE_RATE, SPLITS  # here, not above: the workers import this file without torch
    t0, root = time.time(), Path(out) / "en-de"
    sizes = {"train": cfg.train, "dev": cfg.dev, "tst-COMMON": cfg.test}
    pairs = generate_text(sum(sizes.values()), cfg.seed)
    # test first, then dev, then train: every sentence is distinct, so the splits are disjoint
    chunks, start = {}, 0
    for split in ("tst-COMMON", "dev", "train"):
        chunks[split], start = pairs[start:start + sizes[split]], start + sizes[split]
    rng = random.Random(cfg.seed + 1)
    jobs, plan = [], []
    for split in SPLITS:
        d = root / "data" / split
        (d / "wav").mkdir(parents=True, exist_ok=True)
        (d / "txt").mkdir(parents=True, exist_ok=True)
        split_pairs = chunks[split]
        talks = []
        for t, i in enumerate(range(0, len(split_pairs), cfg.talk_size)):
            voice = rng.choice(VOICES) + rng.choice(VARIANTS)
            talk_id = f"demo_{split.lower().replace('-', '')}_{t:04d}"
            talks.append((talk_id, voice, rng.randint(150, 210), rng.randint(35, 65), rng.randrange(2**31),
                          [en for en, _ in split_pairs[i:i + cfg.talk_size]]))
        shards = [talks[i:i + 5] for i in range(0, len(talks), 5)]   # shard layout is fixed: determinism
        plan.append((split, d, split_pairs, len(shards)))
        jobs += [(str(d / "wav"), s, cfg.noise, SAMPLE_RATE) for s in shards]
    results = speak_shards(jobs, cfg.workers, verbose)
    seconds = 0
    for split, d, split_pairs, n_shards in plan:
        entries = [e for shard in results[:n_shards] for talk in shard for e in talk]
        results = results[n_shards:]
        (d / "txt" / f"{split}.yaml").write_text("".join(_yaml_line(e, SAMPLE_RATE) for e in entries), encoding="utf-8")
        (d / "txt" / f"{split}.en").write_text("".join(en + "\n" for en, _ in split_pairs), encoding="utf-8")
        (d / "txt" / f"{split}.de").write_text("".join(de + "\n" for _, de in split_pairs), encoding="utf-8")
        seconds += sum(e["duration"] for e in entries) / SAMPLE_RATE
    if verbose:
        mb = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20
        print(f"demo corpus: {sum(sizes.values())} segments ({', '.join(f'{k} {v}' for k, v in sizes.items())}), "
              f"{seconds / 3600:.2f} h of speech, {mb:.0f} MB, written in {time.time() - t0:.0f} s to {root}")
    return root


# ----------------------------------------------------------------------------------------------
# 4. Command line
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description="write the built-in demo corpus in MuST-C layout")
    p.add_argument("--out", required=True, help="folder; the corpus goes to OUT/en-de")
    for k in ("train", "dev", "test", "seed", "talk_size", "workers"):
        p.add_argument(f"--{k}", type=int, default=getattr(DemoConfig, k))
    p.add_argument("--noise", type=float, default=DemoConfig.noise)
    a = p.parse_args(argv)
    write_demo_corpus(a.out, DemoConfig(**{k: getattr(a, k) for k in DemoConfig.__dataclass_fields__}))


if __name__ == "__main__":
    main()
