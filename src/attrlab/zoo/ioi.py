"""Indirect object identification (IOI) prompts.

"When Mary and John went to the store, John gave a drink to" -> " Mary".
Two names are introduced (in either order: ABBA or BABA), one of them (the
subject S) is repeated, and the answer is the other one (the indirect object
IO). Names are drawn uniformly from 50, so the answer can only be found by
reading the context. The wording varies (8 templates x 6 intro words x 6 verbs
of motion x 6 verbs of giving x 16 places x 16 objects). The templates put the
names at different token positions (A at 2-5, B at 4-8, S2 at 9-12), so the
repeated name must be found by content, not by position; every template has 15
tokens with BOS and ends with ``" to"`` at position 14, so prompts of a batch
still have one length. ``ex.positions`` gives the token positions of ``IO``,
``S1``, ``S2`` and ``END`` (:data:`TEMPLATES`).

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

INTROS: tuple[str, ...] = ("When", "After", "While", "Then", "Once", "Before")
MOVES: tuple[str, ...] = ("went to", "walked to", "arrived at", "were at", "got to", "ran to")
GIVES: tuple[str, ...] = ("gave", "handed", "passed", "brought", "sent", "threw")

#: (template, token positions with BOS = 0 of A, B and S2). Every template has
#: 15 tokens and ends with " to" at position 14; a test checks the positions.
TEMPLATES: tuple[tuple[str, dict[str, int]], ...] = (
    ("{intro} {A} and {B} {move} the {place}, {S} {give} a {obj} to", {"A": 2, "B": 4, "S2": 10}),
    ("Then {A} and {B} {move} the {place}, and {S} {give} it to", {"A": 2, "B": 4, "S2": 11}),
    ("{intro} {A} met {B} at the {place}, {S} {give} a {obj} back to", {"A": 2, "B": 4, "S2": 9}),
    ("Later, {A} and {B} {move} the {place}. {S} {give} it to", {"A": 3, "B": 5, "S2": 11}),
    ("{intro} {A} and {B} {move} the {place} that day, {S} spoke to", {"A": 2, "B": 4, "S2": 12}),
    ("Yesterday {A} {move} the {place} with {B}, and {S} {give} it to", {"A": 2, "B": 8, "S2": 11}),
    ("Later, {A} met {B} at the {place}. {S} {give} a {obj} to", {"A": 3, "B": 5, "S2": 10}),
    ("At the {place}, {A} and {B} talked, and {S} {give} it to", {"A": 5, "B": 7, "S2": 11}),
)

#: token position (with BOS) of the final token " to" in every template
END = 14


@dataclass
class IOIExample(Example):
    """An IOI prompt.

    Attributes:
        io, s: the indirect object (answer) and subject names, without space.
        order: ``"ABBA"`` (IO first) or ``"BABA"`` (S first).
        positions: token positions (BOS = 0) of ``"IO"``, ``"S1"``, ``"S2"``, ``"END"``.
        layout: index of the prompt's template in :data:`TEMPLATES` (prompts of one
            layout have their names at the same positions, e.g. for patching
            position by position across prompts).
        counterfactual_abc: the ABC corruption (three fresh names).
    """

    io: str = ""
    s: str = ""
    order: str = "ABBA"
    positions: dict[str, int] = field(default_factory=dict)
    counterfactual_abc: str = ""
    layout: int = 0


class IOI(Task):
    """Indirect object identification over 50 names, 8 layouts, varied wording.

    Example:
        >>> from attrlab.zoo.ioi import IOI
        >>> ex = IOI().examples(1, seed=3)[0]
        >>> ex.prompt.count(ex.s) == 2 and ex.prompt.count(ex.io) == 1
        True
    """

    name = "ioi"
    description = "indirect object identification: continue with the non-repeated name"
    #: the layouts to draw from (a subclass or an experiment may narrow them)
    templates: tuple[tuple[str, dict[str, int]], ...] = TEMPLATES

    def _sample(self, rng: random.Random, split: str) -> IOIExample:
        io, s, c1, c2, c3 = rng.sample(NAMES, 5)
        words = dict(
            intro=rng.choice(INTROS),
            move=rng.choice(MOVES),
            give=rng.choice(GIVES),
            place=rng.choice(PLACES),
            obj=rng.choice(OBJECTS),
        )
        template, pos = rng.choice(self.templates)
        order = rng.choice(("ABBA", "BABA"))
        a, b = (io, s) if order == "ABBA" else (s, io)
        io_pos, s1_pos = (pos["A"], pos["B"]) if order == "ABBA" else (pos["B"], pos["A"])
        return IOIExample(
            prompt=template.format(A=a, B=b, S=s, **words),
            answer=" " + io,
            wrong=" " + s,
            counterfactual=template.format(A=a, B=b, S=io, **words),
            io=io,
            s=s,
            order=order,
            positions={"IO": io_pos, "S1": s1_pos, "S2": pos["S2"], "END": END},
            counterfactual_abc=template.format(A=c1, B=c2, S=c3, **words),
            layout=TEMPLATES.index((template, pos)),
        )

    def vocabulary(self) -> tuple[list[str], list[str]]:
        return self.sample_texts(), [*NAMES, *PLACES, *OBJECTS, *INTROS, *GIVES]
