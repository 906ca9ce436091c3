"""Word pools for the synthetic traces, each split into a training part and a held-out part.

Held-out subjects and values never occur in a training trace (`split` partitions every pool by a fixed
rule; training names and many training values are made up on the spot from syllables, never one of the
held-out invented names), so an evaluation on the held-out split measures copying and matching, not
memorisation, and training cannot get far by memorising names instead of copying them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

FIRST_NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Liam Maria Nathan Olivia Peter Quinn Rachel "
    "Samuel Tara Umar Vera Walter Xenia Yusuf Zoe Aaron Bella Caleb Diana Ethan Fiona George Hannah Isaac Julia "
    "Kevin Laura Mason Nora Oscar Paula Ryan Sofia Thomas Ursula Victor Wendy Adam Brenda Carlos Daisy Edward "
    "Felix Gloria Hugo Ingrid James Kira Leo Mila Noah Omar Priya Rosa Simon Tina Uma Violet Wyatt Yara Zack "
    "Amir Beatrice Chen Dmitri Elena Farah Gustav Helga Ivan Jonas Keiko Lars Mei Nadia Otto Pablo Rania Sven "
    "Tomas Ulla Vivian Wei Yuki Zara Anya Boris Clara Dario Elif Femi Greta Hiro Ines Jorge Kofi Lena Marco Nina "
    "Oleg Petra Raj Sara Theo Ulrich Valentina Willem Xavier Yasmin Zeno Arjun Bianca Cyrus Delia Emil Freya "
    "Gideon Hazel Idris Jada Kai Luca Maya Nico Orla Pia Reza Selma Tobias Una Vito Wanda Yosef Zelda"
).split()

COLOURS = ("teal crimson amber olive navy maroon ivory coral indigo lavender scarlet turquoise beige magenta "
           "mustard silver bronze emerald charcoal peach plum saffron cobalt jade ochre mauve azure lilac").split()
CITIES = ("Lisbon Oslo Dublin Vienna Prague Madrid Berlin Paris Rome Athens Warsaw Helsinki Zurich Geneva "
          "Seattle Denver Boston Austin Toronto Montreal Chicago Portland Sydney Auckland Nairobi Cairo Lagos "
          "Mumbai Delhi Seoul Osaka Kyoto Manila Jakarta Lima Quito Bogota Santiago Havana Porto Bergen Krakow "
          "Riga Tallinn Vilnius Sofia Zagreb Split Graz Lyon Nantes Seville Valencia Naples Turin Bremen").split()
FOODS = ("sushi lasagna paella ramen tacos curry risotto falafel pancakes dumplings goulash burritos pho "
         "ravioli pierogi kimchi hummus moussaka gnocchi couscous biryani ceviche tiramisu waffles brownies "
         "gazpacho omelettes quesadillas baklava croissants").split()
JOBS = ("nurse pilot teacher architect chemist plumber lawyer baker dentist engineer librarian electrician "
        "journalist pharmacist surveyor carpenter translator geologist florist welder optician accountant "
        "veterinarian firefighter animator economist").split()
PETS = ("Biscuit Pepper Mochi Rex Luna Ziggy Noodle Pickles Waffles Tofu Maple Clover Pumpkin Oreo Sprout "
        "Nacho Bingo Domino Figaro Juniper Kiwi Marble Nutmeg Pebble Rocket Sushi Tango Velvet Whiskers Yoshi").split()
SPORTS = ("tennis rugby cricket hockey chess rowing fencing cycling badminton golf judo archery curling "
          "volleyball handball sailing climbing skiing surfing karate").split()
DRINKS = ("espresso lemonade green tea cocoa cider kombucha chai matcha iced coffee mint tea ginger ale "
          "hot chocolate orange juice sparkling water").split(" ")
INSTRUMENTS = ("piano violin cello flute trumpet guitar drums clarinet harp oboe banjo saxophone ukulele "
               "accordion trombone").split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()

SYLLABLES = ("ka ri to mel an dor vi sa len bra qu ix ol fen tar zu mo ne lis gar pe thu ra co vel "
              "syn dra kor ma bel ul ven ish ta na ro fi").split()


def split(pool: tuple[str, ...] | list[str], held_out: bool) -> list[str]:
    """Every fourth item (by position) is held out; the rest are for training."""
    return [item for i, item in enumerate(pool) if (i % 4 == 3) == held_out]


def invented_names(count: int, held_out: bool) -> list[str]:
    """Made-up capitalised names from syllables; the training and held-out sets are disjoint."""
    rng = random.Random(9001 if held_out else 1009)
    other = set() if held_out else set(invented_names(count, held_out=True))
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in names and name not in other and name not in FIRST_NAMES:
            names.append(name)
    return names


def _digits(rng: random.Random, low: int, high: int) -> str:
    return str(rng.randint(low, high))


FRESH_SHARE = 0.6  # training draws: the share of names (and of word values) made up on the spot


def held_out_words() -> frozenset[str]:
    """Every held-out name and word value, lower-cased: what a made-up training word must never be."""
    pools = (FIRST_NAMES, COLOURS, CITIES, FOODS, JOBS, PETS, SPORTS, DRINKS, INSTRUMENTS)
    words = [w for pool in pools for w in split(pool, True)] + invented_names(HELD_OUT_INVENTED, True)
    return frozenset(w.lower() for w in words)


PIECE_MAX_LETTERS = 4  # the pieces an unknown word breaks into: a vocabulary trained on these traces merges
# longer runs only for its own syllable names and pool words
PIECE_SHARE = 0.7  # made-up words: the share built from the tokenizer's pieces (when given) rather than syllables
PIECE_MAX_COUNT = 3  # pieces in a made-up word, at most (held-out words such as "electrician" break into 5-6)


@dataclass(frozen=True)
class WordPieces:
    """The tokenizer's alphabetic tokens of up to PIECE_MAX_LETTERS letters, to make words from: `lower`
    ("re", "arch"), `upper` ("Mon"); a made-up word takes 1 to `max_count` of them."""

    lower: tuple[str, ...]
    upper: tuple[str, ...]
    max_count: int = PIECE_MAX_COUNT

    @classmethod
    def from_vocab(cls, tokens: Iterable[str], max_count: int = PIECE_MAX_COUNT) -> WordPieces:
        if max_count < 1:
            raise ValueError(f"a word needs at least one piece, got max_count={max_count}")
        alphabetic = sorted(t for t in set(tokens) if t.isascii() and t.isalpha() and len(t) <= PIECE_MAX_LETTERS)
        return cls(tuple(t for t in alphabetic if t.islower()),
                   tuple(t for t in alphabetic if t[0].isupper() and (len(t) == 1 or t[1:].islower())), max_count)


def fresh_word(rng: random.Random, reserved: frozenset[str], pieces: WordPieces | None = None,
               capital: bool = False) -> str:
    """A made-up word, not in `reserved` (training only): with tens of thousands of them, a name cannot be
    memorised, only copied from where the prompt states it. From syllables, or (PIECE_SHARE of the time,
    given `pieces`) from 1 to `pieces.max_count` of the tokenizer's short alphabetic tokens: a word of any
    such tokens, so each is one the model has copied into an action (an unseen word like "Montreal" breaks
    into tokens no syllable word has, and a model that never wrote them into an action does not copy them
    there; nor, measured, a word of more of them than it ever wrote: "electrician" came out "electrici")."""
    while True:
        if pieces is not None and rng.random() < PIECE_SHARE:
            count = rng.randint(1, pieces.max_count)
            head = rng.choice(pieces.upper) if capital else rng.choice(pieces.lower)
            word = head + "".join(rng.choice(pieces.lower) for _ in range(count - 1))
        else:
            word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
            word = word.capitalize() if capital else word
        if len(word) > 1 and word.lower() not in reserved:
            return word


def attribute_values(held_out: bool, pieces: WordPieces | None = None) -> dict[str, callable]:
    """attribute phrase -> a function rng -> value, drawing from that split's pools; training word values are
    made up on the spot FRESH_SHARE of the time (held-out values are the pools' held-out words only)."""
    reserved = held_out_words()

    def pick(pool: tuple[str, ...] | list[str]) -> callable:
        part = split(pool, held_out)
        capital = part[0][:1].isupper()
        if held_out:
            return lambda rng: rng.choice(part)

        def draw(rng: random.Random) -> str:
            if rng.random() >= FRESH_SHARE:
                return rng.choice(part)
            return fresh_word(rng, reserved, pieces, capital)

        return draw

    return {
        "favourite colour": pick(COLOURS),
        "favourite food": pick(FOODS),
        "home city": pick(CITIES),
        "job": pick(JOBS),
        "pet's name": pick(PETS),
        "favourite sport": pick(SPORTS),
        "favourite drink": pick(DRINKS),
        "instrument": pick(INSTRUMENTS),
        "meeting day": pick(WEEKDAYS),
        "birthday": lambda rng: f"{rng.choice(MONTHS)} {rng.randint(1, 28)}",
        "phone extension": lambda rng: _digits(rng, 100, 9999),
        "locker number": lambda rng: _digits(rng, 1, 999),
        "room number": lambda rng: _digits(rng, 100, 899),
        "lucky number": lambda rng: _digits(rng, 1, 99),
        "employee id": lambda rng: f"E-{rng.randint(1000, 9999)}",
        "flight number": lambda rng: f"{rng.choice('ABCDEFKLMSTUZ')}{rng.choice('AKLXYZ')} {rng.randint(10, 999)}",
    }


HELD_OUT_INVENTED = 60


def subject_sampler(held_out: bool, pieces: WordPieces | None = None) -> callable:
    """rng -> a person the fact is about. Held out: real first names and invented ones no training trace
    has. Training: the other real first names, or (FRESH_SHARE of the time) a name made up on the spot."""
    if held_out:
        names = split(FIRST_NAMES, True) + invented_names(HELD_OUT_INVENTED, True)
        return lambda rng: rng.choice(names)
    names = split(FIRST_NAMES, False)
    reserved = held_out_words() | frozenset(name.lower() for name in FIRST_NAMES)

    def draw(rng: random.Random) -> str:
        return fresh_word(rng, reserved, pieces, capital=True) if rng.random() < FRESH_SHARE else rng.choice(names)

    return draw
