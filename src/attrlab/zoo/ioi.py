"""Indirect object identification (IOI) prompts.

"When Mary and John went to the store, John gave a drink to" -> " Mary".
Two names are introduced (in either order: ABBA or BABA), one of them (the
subject S) is repeated, and the answer is the other one (the indirect object
IO). Names are drawn uniformly from 50, so the answer can only be found by
reading the context. The wording varies (6 intro words x 6 verbs of motion x
6 verbs of giving x 16 places x 16 objects) but every prompt has the same
15-token layout (with BOS), so prompts of a batch align position by position:
the names are at token positions 2 and 4 (A, B) and 10 (S2), the last token at 14
(:data:`POSITIONS`).

Counterfactuals (same token length):

- ``counterfactual``: the repeated subject replaced by the IO
  ("... Mary gave a drink to" -> " John"), so the answer becomes ``wrong`` (= S);
- ``counterfactual_abc``: the three name positions filled with three other
  distinct names (the "ABC" corruption, no information about IO or S).

Example:
    >>> import attrlab as al
    >>> ex = al.zoo.task("ioi").examples(1, seed=0)[0]
    >>> ex.answer == " " + ex.io and ex.wrong == " " + ex.s
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .task import Example, Task
from .words import NAMES, OBJECTS, PLACES

# Every prompt has the same layout (so all IOI prompts have the same length and
# the names sit at the same token positions): intro word, A, "and", B, two verb
# words, "the", place, ",", S, verb, "a", object, "to". The words vary.
INTROS: tuple[str, ...] = ("When", "After", "While", "Then", "Once", "Before")
MOVES: tuple[str, ...] = ("went to", "walked to", "arrived at", "were at", "got to", "ran to")
GIVES: tuple[str, ...] = ("gave", "handed", "passed", "brought", "sent", "threw")
TEMPLATE = "{intro} {A} and {B} {move} the {place}, {S} {give} a {obj} to"

#: token positions (with the BOS token at 0) of the names and the final token
POSITIONS: dict[str, int] = {"A": 2, "B": 4, "S2": 10, "END": 14}


@dataclass
class IOIExample(Example):
    """An IOI prompt.

    Attributes:
        io, s: the indirect object (answer) and subject names, without space.
        order: ``"ABBA"`` (IO first) or ``"BABA"`` (S first).
        positions: token positions (BOS = 0) of ``"IO"``, ``"S1"``, ``"S2"``, ``"END"``.
        counterfactual_abc: the ABC corruption (three fresh names).
    """

    io: str = ""
    s: str = ""
    order: str = "ABBA"
    positions: dict[str, int] = field(default_factory=dict)
    counterfactual_abc: str = ""


class IOI(Task):
    """Indirect object identification over 50 names, one layout, varied wording.

    Example:
        >>> from attrlab.zoo.ioi import IOI
        >>> ex = IOI().examples(1, seed=3)[0]
        >>> ex.prompt.count(ex.s) == 2 and ex.prompt.count(ex.io) == 1
        True
    """

    name = "ioi"
    description = "indirect object identification: continue with the non-repeated name"

    def _sample(self, rng: random.Random, split: str) -> IOIExample:
        io, s, c1, c2, c3 = rng.sample(NAMES, 5)
        words = dict(
            intro=rng.choice(INTROS),
            move=rng.choice(MOVES),
            give=rng.choice(GIVES),
            place=rng.choice(PLACES),
            obj=rng.choice(OBJECTS),
        )
        order = rng.choice(("ABBA", "BABA"))
        a, b = (io, s) if order == "ABBA" else (s, io)
        io_pos, s1_pos = (2, 4) if order == "ABBA" else (4, 2)
        return IOIExample(
            prompt=TEMPLATE.format(A=a, B=b, S=s, **words),
            answer=" " + io,
            wrong=" " + s,
            counterfactual=TEMPLATE.format(A=a, B=b, S=io, **words),
            io=io,
            s=s,
            order=order,
            positions={"IO": io_pos, "S1": s1_pos, "S2": 10, "END": 14},
            counterfactual_abc=TEMPLATE.format(A=c1, B=c2, S=c3, **words),
        )

    def vocabulary(self) -> tuple[list[str], list[str]]:
        return self.sample_texts(), [*NAMES, *PLACES, *OBJECTS, *INTROS, *GIVES]
