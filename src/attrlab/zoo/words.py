"""Word lists of the zoo's synthetic worlds (names, places, objects, made-up words).

Every word here is a single token of the zoo tokenizers, with or without a
leading space (see :mod:`attrlab.zoo.tokenizer`).

Example:
    >>> from attrlab.zoo.words import NAMES
    >>> "Mary" in NAMES
    True
"""

from __future__ import annotations

NAMES: tuple[str, ...] = (
    "Mary", "John", "Anna", "Tom", "Sarah", "James", "Emma", "David", "Laura", "Michael",
    "Alice", "Robert", "Kate", "Daniel", "Lucy", "Peter", "Julia", "Paul", "Rose", "Mark",
    "Grace", "Simon", "Helen", "Adam", "Clara", "Henry", "Nora", "Oscar", "Eva", "Jack",
    "Lisa", "Frank", "Amy", "George", "Ruth", "Sam", "Ella", "Victor", "Jane", "Max",
    "Sophie", "Luke", "Olivia", "Ben", "Diana", "Carl", "Irene", "Hugo", "Maya", "Eric",
)  # fmt: skip

PLACES: tuple[str, ...] = (
    "store", "park", "school", "office", "garden", "station", "market", "library",
    "beach", "hospital", "museum", "restaurant", "house", "bank", "theater", "church",
)  # fmt: skip

OBJECTS: tuple[str, ...] = (
    "drink", "book", "ring", "letter", "bag", "key", "cake", "flower", "gift", "ball",
    "hat", "bottle", "pen", "phone", "coin", "basket",
)  # fmt: skip

CITIES: tuple[str, ...] = (
    "Paris", "Rome", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo", "Berlin", "Madrid", "Vienna",
    "Dublin", "Prague", "Athens", "Lisbon", "Moscow", "Seoul", "Sydney", "Boston", "Denver",
    "Miami", "Munich", "Milan", "Geneva", "Zurich",
)  # fmt: skip

PETS: tuple[str, ...] = (
    "cat", "dog", "parrot", "rabbit", "horse", "goat", "turtle", "hamster", "snake", "fish",
    "mouse", "pony", "duck", "lizard", "frog", "owl",
)  # fmt: skip

JOBS: tuple[str, ...] = (
    "doctor", "teacher", "farmer", "pilot", "baker", "lawyer", "nurse", "painter", "writer",
    "singer", "driver", "dancer", "chef", "judge", "builder", "sailor",
)  # fmt: skip

INSTRUMENTS: tuple[str, ...] = (
    "piano", "guitar", "violin", "drum", "flute", "harp", "cello", "trumpet", "banjo", "organ",
    "bass", "horn",
)  # fmt: skip

COLORS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "pink",
    "gray", "gold",
)  # fmt: skip

LANGUAGES: tuple[str, ...] = (
    "Velish", "Tarnic", "Osmian", "Kelvan", "Durese", "Pellic", "Ambrish", "Sorvic",
    "Lunese", "Grettic", "Farlish", "Quennic",
)  # fmt: skip

ANIMALS: tuple[str, ...] = (
    "wolf", "bear", "eagle", "lion", "fox", "deer", "tiger", "hawk", "seal", "crane",
    "otter", "bison",
)  # fmt: skip

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def made_up_words(n: int, length: int = 2, capitalize: bool = False) -> list[str]:
    """``n`` distinct pronounceable made-up words (CV syllables), in a fixed order.

    Example:
        >>> made_up_words(3)
        ['baba', 'babe', 'babi']
    """
    words: list[str] = []
    for c1 in _CONSONANTS:
        for v1 in _VOWELS:
            for c2 in _CONSONANTS:
                for v2 in _VOWELS:
                    w = c1 + v1 + c2 + v2
                    if length == 3:
                        w += "r"
                    words.append(w.capitalize() if capitalize else w)
                    if len(words) == n:
                        return words
    raise ValueError(f"cannot make {n} words")
