"""A generator of short movie reviews with positive, negative and neutral wording.

Deterministic from a seed. Reviews are built from sentence shapes whose slots are
filled from word lists, so the text varies far more than a model of this size can
memorise, while the sentiment of each review stays unambiguous to a reader.
"""

from __future__ import annotations

import random

LABELS = ("negative", "neutral", "positive")

SUBJECTS = """movie film picture feature story plot script screenplay story-line ending opening
finale premise dialogue acting cast lead performance direction cinematography camera-work
editing pacing soundtrack score music production costumes effects visuals villain hero
heroine sequel remake adaptation documentary comedy drama thriller romance western musical
cartoon mystery""".split()

ACTORS = """Ada Bruno Carla Dmitri Elena Farid Greta Hugo Ingrid Jonas Kira Luis Mira Nadia
Oskar Priya Quentin Rosa Stefan Tara Umar Vera Walter Xenia Yusuf Zoe""".split()

DIRECTORS = """Abbot Berger Castillo Dorsey Eklund Fontaine Garrido Holm Iwata Janssen Kovacs
Lindqvist Moreau Novak Ortega Petrov""".split()

POS_ADJ = """great wonderful brilliant superb excellent delightful charming moving
beautiful gorgeous stunning powerful gripping touching funny hilarious clever witty
fresh inventive thrilling marvellous magnificent masterful elegant heartfelt joyful
uplifting tender warm lovely fantastic terrific remarkable memorable captivating
compelling engaging enchanting radiant splendid""".split()

NEG_ADJ = """terrible awful dreadful horrible boring dull tedious clumsy lifeless bland
painful awkward messy shallow pointless tiresome lazy stale sloppy weak poor
disappointing forgettable annoying irritating cheap hollow flat confusing ugly
miserable clunky dire grim laughable pathetic incoherent overlong joyless""".split()

NEU_ADJ = """long short average ordinary typical standard conventional familiar modest
quiet simple straightforward predictable old recent black-and-white silent colour
foreign local regional independent low-budget mid-length seasonal""".split()

POS_ADV = "truly really deeply wonderfully beautifully genuinely utterly remarkably".split()
NEG_ADV = "painfully utterly hopelessly badly dreadfully truly really awfully".split()
NEU_ADV = "mostly roughly fairly somewhat largely partly".split()

POS_VERB = """loved adored enjoyed admired cherished relished savoured praised""".split()
NEG_VERB = """hated loathed disliked regretted endured resented despised""".split()
NEU_VERB = """watched saw viewed rented streamed noticed caught""".split()

POS_NOUN = """joy delight treat gem triumph pleasure masterpiece wonder""".split()
NEG_NOUN = """mess disaster bore chore failure letdown waste slog""".split()

GENRES = """horror comedy drama thriller romance action science-fiction fantasy
animated war crime heist courtroom sports family""".split()

TIMES = """yesterday tonight recently on-Sunday last-week at-the-festival on-a-plane
with-friends with-my-family at-the-cinema on-television at-home""".split()

PLACES = """Paris Rome Tokyo Lagos Lima Oslo Cairo Seoul Madrid Dublin Mumbai Quebec""".split()

NUMBERS = "two three four five six seven eight nine ten".split()

OPENERS = {
    "positive": ["Honestly,", "Wow,", "Simply put,", "Without doubt,", "Happily,"],
    "negative": ["Sadly,", "Honestly,", "Unfortunately,", "Alas,", "Frankly,"],
    "neutral": ["Overall,", "In short,", "For the record,", "As expected,", "Basically,"],
}

# Sentence shapes. {a}: adjective, {v}: adverb, {vb}: verb, {n}: noun of the sentiment;
# {s}: subject, {x}: actor, {d}: director, {g}: genre, {t}: time, {p}: place, {k}: number.
# Shapes shared by positive and negative reviews: the sentiment lives in the slot words.
POLAR_SHAPES = [
    "the {s} was {a} .",
    "the {s} is {v} {a} .",
    "I {vb} this {g} {s} .",
    "{x} gives a {a} performance .",
    "what a {a} {s} !",
    "{d} made a {a} {g} film .",
    "a {v} {a} {n} from start to finish .",
    "the {s} and the {s2} are both {a} .",
    "I watched it {t} and it was {a} .",
    "easily the most {a} {g} film of the year .",
    "{x} and {x2} are {a} together .",
    "it is a {n} , {v} {a} .",
    "the scenes in {p} are {a} .",
    "every minute of the {s} feels {a} .",
]
SHAPES = {
    "positive": POLAR_SHAPES + ["I would watch it {k} more times .", "you will leave the cinema {a} and happy ."],
    "negative": POLAR_SHAPES + ["I want those {k} hours back .", "you will leave the cinema {a} and angry ."],
    "neutral": [
        "the {s} was {a} .",
        "the {s} is {v} {a} .",
        "I {vb} this {g} {s} {t} .",
        "{x} plays a {a} role .",
        "it is a {a} {g} film by {d} .",
        "the {s} runs about {k} minutes past the hour .",
        "{x} and {x2} star in it .",
        "the story is set in {p} .",
        "it was released in {k} cinemas .",
        "the {s} follows a {a} pattern .",
        "{d} directed it after a {g} film .",
        "there are {k} main characters .",
        "the {s} is in {a} colour and sound .",
        "it is a {g} film like many others .",
    ],
}

WORDS = {
    "positive": dict(a=POS_ADJ, v=POS_ADV, vb=POS_VERB, n=POS_NOUN),
    "negative": dict(a=NEG_ADJ, v=NEG_ADV, vb=NEG_VERB, n=NEG_NOUN),
    "neutral": dict(a=NEU_ADJ, v=NEU_ADV, vb=NEU_VERB, n=NEU_ADJ),
}


def _slots(rng: random.Random, label: str) -> dict[str, str]:
    w = WORDS[label]
    s, s2 = rng.sample(SUBJECTS, 2)
    x, x2 = rng.sample(ACTORS, 2)
    return dict(
        a=rng.choice(w["a"]), v=rng.choice(w["v"]), vb=rng.choice(w["vb"]), n=rng.choice(w["n"]),
        s=s, s2=s2, x=x, x2=x2, d=rng.choice(DIRECTORS), g=rng.choice(GENRES),
        t=rng.choice(TIMES), p=rng.choice(PLACES), k=rng.choice(NUMBERS),
    )


def _render(shape: str, slots: dict[str, str]) -> str:
    return shape.format(**slots).replace("-", " ")


def _sentence(rng: random.Random, label: str) -> str:
    slots = _slots(rng, label)
    return _render(rng.choice(SHAPES[label]), slots)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def review(rng: random.Random, label: str) -> str:
    """One review of 2-4 sentences; a positive or negative one may hold one neutral fact."""
    n = rng.randint(2, 4)
    labels = [label] * n
    if label != "neutral" and n > 2 and rng.random() < 0.5:
        labels[rng.randrange(1, n)] = "neutral"
    sentences = [_sentence(rng, lab) for lab in labels]
    if rng.random() < 0.3:
        sentences[0] = f"{rng.choice(OPENERS[label])} {sentences[0]}"
    return " ".join(_cap(s) for s in sentences)


def reviews(n: int, seed: int) -> list[tuple[str, str]]:
    """n (text, label) pairs, labels balanced over negative, neutral, positive."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = LABELS[i % 3]
        out.append((review(rng, label), label))
    rng.shuffle(out)
    return out


def vocabulary() -> set[str]:
    """Every word the generator can emit (for the tests' variety check)."""
    words: set[str] = set()
    pools = [SUBJECTS, ACTORS, DIRECTORS, GENRES, TIMES, PLACES, NUMBERS]
    pools += [p for w in WORDS.values() for p in w.values()]
    pools += [s.split() for shapes in SHAPES.values() for s in shapes]
    pools += [o.split() for ops in OPENERS.values() for o in ops]
    for pool in pools:
        for item in pool:
            words.update(item.replace("-", " ").split())
    return {w for w in words if "{" not in w}


def preference_pair(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): one sentence shape with the same facts, continued
    positively (chosen) or negatively (rejected) from the first word where they differ."""
    shape = rng.choice(POLAR_SHAPES)
    facts = _slots(rng, "neutral")
    versions = {
        label: _render(shape, {**facts, **{k: rng.choice(v) for k, v in WORDS[label].items()}}).split()
        for label in ("positive", "negative")
    }
    pos, neg = versions["positive"], versions["negative"]
    k = next(i for i, (a, b) in enumerate(zip(pos, neg)) if a != b)
    prompt = _cap(" ".join(pos[:k]))
    if k == 0 or rng.random() < 0.3:  # sometimes a neutral fact first
        prompt = f"{_cap(_sentence(rng, 'neutral'))} {prompt}".strip()
    more = rng.randint(1, 2)
    chosen = " ".join([" ".join(pos[k:])] + [_cap(_sentence(rng, "positive")) for _ in range(more)])
    rejected = " ".join([" ".join(neg[k:])] + [_cap(_sentence(rng, "negative")) for _ in range(more)])
    return prompt, chosen, rejected


def preference_pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    return [preference_pair(rng) for _ in range(n)]
