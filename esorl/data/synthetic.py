"""An embedded, seeded, deterministic corpus of short labelled reviews (SST-2 style).

The corpus is written by us, so it needs no download and carries no licence: every
machine (CI, a laptop, a GPU node) can regenerate exactly the same files from a seed.
It is small enough that a tiny LM learns it in minutes, but it has real structure for a
model (and a reward) to pick up:

* seven domains (restaurants, films, phones, hotels, books, video games, headphones),
  each with aspect-specific subjects and adjectives (food is *delicious* or *bland*,
  staff are *friendly* or *rude*), plus generic adjectives of both polarities;
* intensifiers ("really", "absolutely", ...), negation that flips polarity
  ("not bad", "never boring", "hardly impressive", "i can not recommend it enough"),
  domain events ("the battery died after a week"), opinions and recommendations;
* two- and three-clause sentences joined by "and" / "so" / "because" / "," (same
  polarity), and mixed sentences joined by "but" / "although" whose label follows the
  final (main) clause.

Sentences are lower-cased, words and punctuation separated by single spaces, 6–25 words.
Label ``1`` = positive, ``0`` = negative, drawn with probability 1/2 each.

Determinism: only a private :class:`random.Random` seeded with an ``int`` is used (never
the global generator), and all word lists are tuples with a fixed order, so the same seed
gives byte-identical output on any machine and Python >= 3.10.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

__all__ = [
    "generate_reviews",
    "write_synthetic_corpus",
    "positive_words",
    "negative_words",
    "MIN_WORDS",
    "MAX_WORDS",
]

MIN_WORDS = 6
MAX_WORDS = 25

# ---------------------------------------------------------------------------------------
# Lexicon. Subjects are "noun phrase|copula" strings so that verbs agree ("the staff
# were", "the service was"). Each aspect pairs subjects with adjectives that make sense
# for them; polarity of every adjective is fixed corpus-wide (checked by the tests).
# ---------------------------------------------------------------------------------------

_GENERIC_POS = (
    "good", "great", "wonderful", "excellent", "fantastic", "superb", "amazing",
    "brilliant", "outstanding", "impressive", "lovely", "terrific", "delightful",
    "solid", "pleasant", "nice", "fabulous", "marvelous",
)
_GENERIC_NEG = (
    "bad", "terrible", "awful", "poor", "horrible", "dreadful", "disappointing",
    "mediocre", "lousy", "abysmal", "appalling", "underwhelming", "unpleasant",
    "subpar", "pathetic", "atrocious",
)
_INTENSIFIERS = (
    "very", "really", "absolutely", "truly", "incredibly", "extremely", "so",
    "remarkably", "genuinely", "thoroughly", "utterly", "pretty", "quite",
)
# Negators that turn a *negative* adjective into a positive statement ("never boring").
_NEGATE_NEG = ("not", "never", "not at all", "far from", "anything but", "not remotely")
# Negators that turn a *positive* adjective into a negative statement ("hardly clever").
_NEGATE_POS = ("not", "never", "hardly", "far from", "not very", "not exactly", "not particularly")

_OPENERS = (
    "honestly", "overall", "to be honest", "in short", "all in all", "frankly",
    "in my opinion", "to sum up", "on the whole", "simply put",
)
_OPINION_POS = ("i loved", "i really enjoyed", "i adored", "we loved", "i was impressed by", "i am delighted with")
_OPINION_NEG = ("i hated", "i disliked", "i could not stand", "we hated", "i was disappointed by", "i am unhappy with")
_RECOMMEND_POS = (
    "i would recommend {obj}", "i would definitely recommend {obj}",
    "i would highly recommend {obj}", "i would happily recommend {obj}",
    "i can not recommend {obj} enough", "i recommend {obj} to everyone",
)
_RECOMMEND_NEG = (
    "i would not recommend {obj}", "i would never recommend {obj}",
    "i can not recommend {obj}", "i would not recommend {obj} to anyone",
    "do not waste your money on {obj}", "stay away from {obj}",
)
_VERDICT_NOUN_POS = (
    "a gem", "an absolute gem", "a delight", "a real treat", "a joy", "a triumph",
    "a pleasant surprise", "a winner", "a must", "worth every penny",
)
_VERDICT_NOUN_NEG = (
    "a disaster", "a total disaster", "a mess", "a complete mess", "a letdown",
    "a waste of money", "a waste of time", "a huge disappointment", "a rip off", "a joke",
)


class _Aspect:
    """Subjects (``"the pasta|was"``) with the adjectives that fit them."""

    __slots__ = ("subjects", "pos", "neg")

    def __init__(self, subjects: str, pos: str, neg: str):
        self.subjects = tuple(tuple(s.strip().split("|")) for s in subjects.split(","))
        self.pos = tuple(pos.split())
        self.neg = tuple(neg.split())


class _Domain:
    """One review domain: the objects reviewed, aspects, events and closing verdicts."""

    __slots__ = ("name", "objects", "aspects", "pos_events", "neg_events", "pos_verdicts", "neg_verdicts")

    def __init__(self, name, objects, aspects, pos_events, neg_events, pos_verdicts, neg_verdicts):
        self.name = name
        self.objects = tuple(objects)
        self.aspects = tuple(aspects)
        self.pos_events = tuple(pos_events)
        self.neg_events = tuple(neg_events)
        self.pos_verdicts = tuple(pos_verdicts)
        self.neg_verdicts = tuple(neg_verdicts)


_DOMAINS = (
    _Domain(
        "restaurants",
        ("this restaurant", "this place", "this cafe", "this bistro", "this diner"),
        (
            _Aspect(
                "the pasta|was, the soup|was, the pizza|was, the steak|was, the dessert|was, the bread|was,"
                " the salad|was, the curry|was, the fries|were, the noodles|were, the food|was",
                "delicious tasty fresh flavorful hearty crispy",
                "bland stale greasy salty soggy overcooked tasteless",
            ),
            _Aspect(
                "the staff|were, the waiter|was, the waitress|was, the service|was, the manager|was, the host|was",
                "friendly attentive helpful polite welcoming warm",
                "rude slow careless unfriendly dismissive inattentive",
            ),
            _Aspect(
                "the atmosphere|was, the decor|was, the dining room|was, the music|was, the terrace|was",
                "cozy relaxing charming inviting elegant",
                "noisy cramped gloomy dirty loud",
            ),
        ),
        (
            "the food arrived hot and fast", "every dish was cooked to perfection",
            "the chef came out to say hello", "they gave us a free dessert",
            "the portions were generous for the price", "we never had to wait for a refill",
        ),
        (
            "we waited an hour for our food", "the food arrived cold",
            "they got our order wrong twice", "i found a hair in my soup",
            "the bill was full of mistakes", "nobody came to take our order",
        ),
        ("we will definitely come back", "i would happily eat here again", "it was the best meal i have had in years"),
        ("we will never come back", "i would not eat here again", "save your money and eat somewhere else"),
    ),
    _Domain(
        "films",
        ("this film", "this movie", "this documentary", "this sequel", "this comedy"),
        (
            _Aspect(
                "the plot|was, the story|was, the script|was, the ending|was, the dialogue|was, the twist|was",
                "gripping clever moving original witty surprising",
                "predictable boring dull confusing silly clumsy tedious",
            ),
            _Aspect(
                "the acting|was, the cast|was, the lead actor|was, the villain|was, the performances|were",
                "convincing natural charming funny believable",
                "wooden stiff unconvincing flat forgettable",
            ),
            _Aspect(
                "the soundtrack|was, the cinematography|was, the special effects|were, the pacing|was, the editing|was",
                "stunning beautiful gorgeous tight haunting",
                "cheap sloppy ugly slow messy",
            ),
        ),
        (
            "i laughed from start to finish", "the final scene left me in tears",
            "it kept me on the edge of my seat", "i want to watch it again tonight",
            "the whole theater applauded at the end",
        ),
        (
            "i fell asleep halfway through", "half the audience walked out",
            "i checked my watch every ten minutes", "the jokes never land",
            "i wanted my two hours back",
        ),
        ("see it on the big screen", "it deserves every award it gets", "i will watch it again"),
        ("skip it and read the book instead", "wait until it is free on television", "i will never watch it again"),
    ),
    _Domain(
        "phones",
        ("this phone", "this device", "this handset", "this smartphone"),
        (
            _Aspect(
                "the battery|was, the screen|was, the camera|was, the speaker|was, the charger|was, the case|was",
                "bright sharp sturdy reliable sleek powerful crisp",
                "dim flimsy blurry weak fragile faulty",
            ),
            _Aspect(
                "the software|was, the interface|was, the apps|were, the updates|were, the keyboard|was",
                "fast smooth responsive intuitive snappy",
                "buggy laggy sluggish clunky confusing",
            ),
            _Aspect(
                "the customer support|was, the seller|was, the delivery|was, the packaging|was",
                "helpful quick prompt friendly",
                "useless unhelpful late rude",
            ),
        ),
        (
            "the battery lasts all day", "it takes great photos at night",
            "setup took five minutes", "it survived a drop onto concrete",
            "it charges in less than an hour",
        ),
        (
            "the battery died after a week", "it freezes every few hours",
            "the screen cracked on the first day", "calls keep dropping",
            "it gets hot when i charge it",
        ),
        ("it is worth every penny", "i would buy it again", "best purchase i have made this year"),
        ("i want my money back", "i am sending it back", "i regret buying it"),
    ),
    _Domain(
        "hotels",
        ("this hotel", "this resort", "this inn", "this hostel"),
        (
            _Aspect(
                "the room|was, the bed|was, the bathroom|was, the sheets|were, the pillows|were, the shower|was",
                "clean spacious comfortable spotless quiet modern",
                "dirty cramped dusty noisy tiny smelly shabby",
            ),
            _Aspect(
                "the staff|were, the receptionist|was, the concierge|was, the front desk|was, the cleaners|were",
                "friendly helpful welcoming courteous kind",
                "rude unhelpful careless grumpy indifferent",
            ),
            _Aspect(
                "the pool|was, the breakfast|was, the location|was, the view|was, the gym|was, the wifi|was",
                "convenient relaxing fast generous",
                "crowded inconvenient slow broken",
            ),
        ),
        (
            "they upgraded us to a suite", "we slept like babies",
            "check in took two minutes", "the view from our balcony took my breath away",
            "they left chocolates on our pillows",
        ),
        (
            "the air conditioning never worked", "we found bugs in the bed",
            "the walls were paper thin", "nobody answered the phone at the front desk",
            "the traffic kept us awake all night",
        ),
        ("we will stay here again", "book it without hesitation", "we are already planning our next visit"),
        ("we will never stay here again", "book somewhere else", "we checked out a day early"),
    ),
    _Domain(
        "books",
        ("this book", "this novel", "this memoir", "this collection"),
        (
            _Aspect(
                "the writing|was, the prose|was, the style|was, the chapters|were, the language|was",
                "elegant vivid graceful lyrical sharp engaging",
                "clumsy dense flat repetitive awkward wordy",
            ),
            _Aspect(
                "the story|was, the plot|was, the ending|was, the premise|was, the pacing|was",
                "gripping moving original compelling satisfying",
                "predictable dull tedious rushed muddled pointless",
            ),
            _Aspect(
                "the characters|were, the heroine|was, the narrator|was, the hero|was",
                "memorable believable likable complex",
                "shallow unlikable bland forgettable",
            ),
        ),
        (
            "i could not put it down", "i read it in one sitting",
            "i stayed up all night to finish it", "i have already bought copies for my friends",
        ),
        (
            "i gave up after fifty pages", "i had to force myself to finish it",
            "nothing happens for the first half", "i kept losing track of who was who",
        ),
        ("it is a must read", "i will read everything this author writes", "it belongs on every shelf"),
        ("i will not read the sequel", "it went straight back to the library", "i will not buy another book by this author"),
    ),
    _Domain(
        "games",
        ("this game", "this title", "this puzzle game", "this shooter"),
        (
            _Aspect(
                "the graphics|were, the controls|were, the gameplay|was, the levels|were, the music|was, the story|was",
                "smooth addictive fun beautiful polished immersive",
                "clunky repetitive buggy unfair ugly tedious",
            ),
            _Aspect(
                "the multiplayer|was, the servers|were, the matchmaking|was, the community|was",
                "stable balanced friendly fast",
                "unstable toxic laggy slow",
            ),
        ),
        (
            "i played it for hours without noticing", "every level feels fresh",
            "the boss fights are a blast", "my friends and i play it every weekend",
        ),
        (
            "the game crashed three times in an hour", "the servers are always down",
            "i lost my save file twice", "every level feels the same",
        ),
        ("it is the best game of the year", "i will play it again", "buy it at full price"),
        ("wait for a sale", "i uninstalled it after a day", "i want a refund"),
    ),
    _Domain(
        "headphones",
        ("these headphones", "these earbuds", "this headset"),
        (
            _Aspect(
                "the sound|was, the bass|was, the noise cancelling|was, the microphone|was",
                "rich clear crisp balanced powerful",
                "muddy tinny harsh muffled weak",
            ),
            _Aspect(
                "the fit|was, the ear cushions|were, the headband|was, the build quality|was",
                "comfortable snug sturdy soft",
                "uncomfortable loose flimsy stiff",
            ),
        ),
        (
            "i wear them all day without noticing", "the battery lasts a whole week",
            "they pair with my laptop instantly", "they block out the noise on the train",
        ),
        (
            "the left earbud stopped working after a month", "they keep disconnecting from my phone",
            "they hurt my ears after an hour", "the cable snapped on the second day",
        ),
        ("they are worth every penny", "i would buy them again", "best headphones i have owned"),
        ("i want my money back", "i am sending them back", "i regret buying them"),
    ),
)


def _collect_lexicon(polarity: int) -> list[str]:
    words: set[str] = set(_GENERIC_POS if polarity else _GENERIC_NEG)
    for dom in _DOMAINS:
        for asp in dom.aspects:
            words.update(asp.pos if polarity else asp.neg)
    return sorted(words)


def positive_words() -> list[str]:
    """The positive adjectives of the corpus (sorted, single words; a fresh list)."""
    return _collect_lexicon(1)


def negative_words() -> list[str]:
    """The negative adjectives of the corpus (sorted, single words; a fresh list)."""
    return _collect_lexicon(0)


# ---------------------------------------------------------------------------------------
# Grammar. Every clause builder takes the rng, the domain and the clause polarity
# (1 positive / 0 negative) and returns a string of space-separated words.
# ---------------------------------------------------------------------------------------


def _adjective(rng: random.Random, asp: _Aspect, polarity: int) -> str:
    # Aspect-specific adjectives twice as often as generic ones: they carry the domain
    # structure, the generic ones tie the domains together.
    if rng.random() < 0.67:
        return rng.choice(asp.pos if polarity else asp.neg)
    return rng.choice(_GENERIC_POS if polarity else _GENERIC_NEG)


def _attribute_clause(rng: random.Random, dom: _Domain, polarity: int) -> str:
    """``the pasta was (really) delicious`` / ``the plot was never boring`` / two adjectives."""
    asp = rng.choice(dom.aspects)
    subj, cop = rng.choice(asp.subjects)
    r = rng.random()
    if r < 0.25:
        # Negation: state the opposite-polarity adjective and negate it.
        neg = rng.choice(_NEGATE_NEG if polarity else _NEGATE_POS)
        return f"{subj} {cop} {neg} {_adjective(rng, asp, 1 - polarity)}"
    if r < 0.45:
        a1 = _adjective(rng, asp, polarity)
        a2 = _adjective(rng, asp, polarity)
        if a2 == a1:
            a2 = rng.choice(_GENERIC_POS if polarity else _GENERIC_NEG)
        if a2 != a1:
            return f"{subj} {cop} {a1} and {a2}"
        return f"{subj} {cop} {a1}"
    if r < 0.75:
        return f"{subj} {cop} {rng.choice(_INTENSIFIERS)} {_adjective(rng, asp, polarity)}"
    return f"{subj} {cop} {_adjective(rng, asp, polarity)}"


def _event_clause(rng: random.Random, dom: _Domain, polarity: int) -> str:
    return rng.choice(dom.pos_events if polarity else dom.neg_events)


def _opinion_clause(rng: random.Random, dom: _Domain, polarity: int) -> str:
    """``i loved this film`` / ``this hotel was a total disaster`` / ``i would not recommend ...``."""
    obj = rng.choice(dom.objects)
    r = rng.random()
    if r < 0.35:
        return f"{rng.choice(_OPINION_POS if polarity else _OPINION_NEG)} {obj}"
    if r < 0.7:
        return rng.choice(_RECOMMEND_POS if polarity else _RECOMMEND_NEG).format(obj=obj)
    # "these headphones are" vs "this phone is": plural objects start with "these".
    verb = rng.choice(("are", "were") if obj.startswith("these") else ("is", "was"))
    return f"{obj} {verb} {rng.choice(_VERDICT_NOUN_POS if polarity else _VERDICT_NOUN_NEG)}"


def _verdict_clause(rng: random.Random, dom: _Domain, polarity: int) -> str:
    return rng.choice(dom.pos_verdicts if polarity else dom.neg_verdicts)


def _content_clause(rng: random.Random, dom: _Domain, polarity: int) -> str:
    """A descriptive clause (attribute or event), the body of most sentences."""
    return (_attribute_clause if rng.random() < 0.7 else _event_clause)(rng, dom, polarity)


def _any_clause(rng: random.Random, dom: _Domain, polarity: int) -> str:
    r = rng.random()
    if r < 0.55:
        return _attribute_clause(rng, dom, polarity)
    if r < 0.72:
        return _event_clause(rng, dom, polarity)
    if r < 0.9:
        return _opinion_clause(rng, dom, polarity)
    return _verdict_clause(rng, dom, polarity)


def _conclusion_clause(rng: random.Random, dom: _Domain, polarity: int) -> str:
    return (_opinion_clause if rng.random() < 0.6 else _verdict_clause)(rng, dom, polarity)


def _two_distinct(rng, make, dom, p1, p2) -> tuple[str, str]:
    c1 = make(rng, dom, p1)
    c2 = make(rng, dom, p2)
    if c2 == c1:  # one retry is enough to make repeats rare; they are still valid text
        c2 = make(rng, dom, p2)
    return c1, c2


def _sentence(rng: random.Random, label: int) -> str:
    """One review sentence (without final punctuation) whose sentiment is ``label``."""
    dom = rng.choice(_DOMAINS)
    other = 1 - label
    r = rng.random()
    if r < 0.30:  # single clause, sometimes with an opener ("honestly , ...")
        body = _any_clause(rng, dom, label)
        if rng.random() < 0.35:
            body = f"{rng.choice(_OPENERS)} , {body}"
        return body
    if r < 0.45:  # two descriptive clauses of the same polarity
        c1, c2 = _two_distinct(rng, _content_clause, dom, label, label)
        return f"{c1} {rng.choice(('and', ', and', ', and also'))} {c2}"
    if r < 0.60:  # conclusion + reason, or reason + conclusion
        reason = _content_clause(rng, dom, label)
        concl = _conclusion_clause(rng, dom, label)
        t = rng.random()
        if t < 0.4:
            return f"{concl} , {reason}"
        if t < 0.7:
            return f"{concl} because {reason}"
        return f"{reason} , so {concl}"
    if r < 0.82:  # mixed: the final clause decides the label
        c1, c2 = _two_distinct(rng, _any_clause, dom, other, label)
        joiner = rng.choice(("but", ", but", ", but overall", "but honestly", ", but in the end"))
        return f"{c1} {joiner} {c2}"
    if r < 0.90:  # "although <other> , <label>": the main (final) clause decides
        c1 = _content_clause(rng, dom, other)
        c2 = _any_clause(rng, dom, label)
        return f"{rng.choice(('although', 'even though', 'while'))} {c1} , {c2}"
    # three clauses: two of one polarity, then a turn to the label's polarity
    c1, c2 = _two_distinct(rng, _content_clause, dom, other, other)
    c3 = _any_clause(rng, dom, label)
    return f"{c1} and {c2} , but {c3}"


def _review(rng: random.Random) -> dict:
    label = 1 if rng.random() < 0.5 else 0
    # Rejection sampling keeps lengths in [MIN_WORDS, MAX_WORDS]; it consumes the same
    # rng, so it stays deterministic. Few draws are rejected (short single clauses, long
    # three-clause sentences).
    while True:
        text = f"{_sentence(rng, label)} {'!' if rng.random() < 0.1 else '.'}"
        n = len(text.split())
        if MIN_WORDS <= n <= MAX_WORDS:
            return {"text": text, "label": label}


def generate_reviews(n: int, seed: int = 0) -> list[dict]:
    """``n`` labelled review sentences, deterministic in ``seed``.

    Returns a list of ``{"text": str, "label": int}``; ``label`` 1 = positive, 0 = negative.
    ``generate_reviews(k, s)`` is a prefix of ``generate_reviews(n, s)`` for ``k <= n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        # A float/str seed would hash differently; insist on the documented type.
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    rng = random.Random(seed)
    return [_review(rng) for _ in range(n)]


def _split_seed(seed: int, split: str) -> int:
    """An independent, machine-independent seed per split (so resizing one split does not
    change another). sha256 rather than ``hash()``, which is salted per process."""
    digest = hashlib.sha256(f"esorl-synthetic/{seed}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _write_atomic(path: Path, content: str) -> None:
    data = content.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return  # identical file already there: keep its mtime, avoid racing writers
    from ..io import atomic_write

    atomic_write(path, data, fsync=True)


def write_synthetic_corpus(
    out_dir, n_train: int = 20000, n_dev: int = 1000, n_test: int = 1000, seed: int = 0
) -> dict[str, Path]:
    """Write ``train.tsv``, ``dev.tsv`` and ``test.tsv`` under ``out_dir``.

    Each line is ``text<TAB>label`` (no header), the format of ``shared/data/sst2``. Each
    split has its own seed derived from ``seed``. Files are written atomically and left
    untouched when they already hold identical content. Returns ``{split: path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        rows = generate_reviews(n, _split_seed(seed, split))
        content = "".join(f"{r['text']}\t{r['label']}\n" for r in rows)
        path = out / f"{split}.tsv"
        _write_atomic(path, content)
        paths[split] = path
    return paths
