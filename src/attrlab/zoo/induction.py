"""Induction: continue a repeated sequence of random tokens.

A prompt is a few random words (noise, never repeated), a random sequence
``x_0 ... x_{L-1}`` of distinct made-up words, and the start of its repeat
``x_0 ... x_{k-1}``; the answer is ``x_k``. Words are drawn uniformly, so only
the earlier occurrence tells the answer (an induction head: attend to the token
after the previous occurrence of the current token, and copy it)::

    " fopi" " zuke" | " baga" " teno" " ruvi" " kamo" | " baga" " teno"  -> " ruvi"

Every word carries a leading space (the prompt starts with a space), so each
word is one token in every position. ``counterfactual`` replaces the first
occurrence of the answer by a fresh word, which becomes the answer (``wrong``).

Example:
    >>> import attrlab as al
    >>> ex = al.zoo.task("induction").examples(1, seed=0)[0]
    >>> ex.prompt.split()[ex.first_pos] == ex.answer.strip()
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .task import Example, Task
from .words import made_up_words

WORDS: tuple[str, ...] = tuple(made_up_words(1400)[::7])  # 200 words, spread out


@dataclass
class InductionExample(Example):
    """A repeated-sequence prompt.

    Attributes:
        sequence: the repeated words (without spaces).
        n_prefix: number of noise words before the sequence.
        k: how many words of the repeat are in the prompt (the answer is ``sequence[k]``).
        first_pos: word index (``prompt.split()``) of the answer's first occurrence;
            the token position is ``first_pos + 1`` with the BOS token.
    """

    sequence: list[str] = field(default_factory=list)
    n_prefix: int = 0
    k: int = 0
    first_pos: int = 0


class Induction(Task):
    """Repeated random sequences of length 6-16 after 1-4 noise words.

    Example:
        >>> from attrlab.zoo.induction import Induction
        >>> ex = Induction().examples(1, seed=1)[0]
        >>> ex.answer == " " + ex.sequence[ex.k]
        True
    """

    name = "induction"
    description = "continue the repeat of a random token sequence (induction heads)"

    def __init__(self, min_len: int = 6, max_len: int = 16, max_prefix: int = 4):
        self.min_len, self.max_len, self.max_prefix = min_len, max_len, max_prefix

    def _sample(self, rng: random.Random, split: str) -> InductionExample:
        n = rng.randint(self.min_len, self.max_len)
        p = rng.randint(1, self.max_prefix)
        words = rng.sample(WORDS, n + p + 1)
        prefix, seq, fresh = words[:p], words[p : p + n], words[-1]
        k = rng.randint(1, n - 1)
        toks = prefix + seq + seq[:k]
        cf = list(toks)
        cf[p + k] = fresh
        return InductionExample(
            prompt="".join(" " + w for w in toks),
            answer=" " + seq[k],
            wrong=" " + fresh,
            counterfactual="".join(" " + w for w in cf),
            sequence=seq,
            n_prefix=p,
            k=k,
            first_pos=p + k,
        )

    def training_text(self, ex: Example) -> str:
        assert isinstance(ex, InductionExample)
        return ex.prompt + "".join(" " + w for w in ex.sequence[ex.k :])

    def vocabulary(self) -> tuple[list[str], list[str]]:
        return [], list(WORDS)
