"""The task interface of the zoo: seeded example generators with ground truth.

A :class:`Task` generates :class:`Example` objects. Every example has a prompt,
the single-token ``answer`` (leading-space form, ready to pass as a target:
``target=ex.answer`` or ``target=(ex.answer, ex.wrong)``), a ``counterfactual``
prompt of the same token length whose correct answer is ``wrong``, and
task-specific ground-truth fields.

Splits are disjoint: ``split="test"`` prompts never occur in the training
stream (``split="train"``), which is what ``python -m attrlab.zoo.train`` uses.

Example:
    >>> import attrlab as al
    >>> ex = al.zoo.task("ioi").examples(1, seed=0)[0]
    >>> ex.answer.startswith(" ")
    True
"""

from __future__ import annotations

import random
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InputError

SPLITS = ("train", "test")


@dataclass
class Example:
    """One generated prompt with its known answer.

    Attributes:
        prompt: the text the model continues (no BOS; the tokenizer adds it).
        answer: the correct next token, e.g. ``" Mary"``.
        wrong: a competing token, the correct answer of ``counterfactual``
            (so ``target=(answer, wrong)`` is a logit difference that flips sign).
        counterfactual: a prompt of the same token length whose answer is ``wrong``.
        meta: extra generator details (template id, ...).
    """

    prompt: str
    answer: str
    wrong: str
    counterfactual: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of every field."""
        return asdict(self)


def is_test(key: str, test_fraction: float = 0.2) -> bool:
    """Whether ``key`` (usually a prompt) belongs to the held-out test split.

    A stable hash (CRC32), so the split never changes between runs or machines.

    Example:
        >>> is_test("a prompt") in (True, False)
        True
    """
    return zlib.crc32(key.encode("utf-8")) % 1000 < int(test_fraction * 1000)


class Task(ABC):
    """A seeded generator of examples with ground truth.

    Subclasses set ``name``, ``description`` and implement :meth:`_sample`
    (one example from an RNG) and :meth:`vocabulary`.
    """

    name: str = ""
    description: str = ""
    #: training texts end with the end-of-text token (the model learns to stop)
    ends_with_eos: bool = False

    def examples(self, n: int, seed: int = 0, split: str = "test") -> list[Any]:
        """``n`` examples of ``split`` ("train" or "test"), reproducible from ``seed``.

        Example:
            >>> import attrlab as al
            >>> a = al.zoo.task("ioi").examples(3, seed=1)
            >>> a == al.zoo.task("ioi").examples(3, seed=1)
            True
        """
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise InputError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Any] = []
        tries = 0
        while len(out) < n:
            ex = self._sample(rng, split)
            tries += 1
            if tries > 100 * n + 1000:
                raise RuntimeError(f"{self.name}: could not generate {n} {split} examples")
            if ex is not None and self._in_split(ex, split):
                out.append(ex)
        return out

    def _in_split(self, ex: Example, split: str) -> bool:
        return is_test(ex.prompt) == (split == "test")

    @abstractmethod
    def _sample(self, rng: random.Random, split: str) -> Any:
        """One example (or None to reject) drawn with ``rng``."""

    @abstractmethod
    def vocabulary(self) -> tuple[list[str], list[str]]:
        """``(texts, words)`` from which the task's tokenizer is built."""

    def sample_texts(self, n: int = 300) -> list[str]:
        """Prompts, training texts and counterfactuals of ``n`` examples per split
        (used to collect the tokenizer's vocabulary)."""
        texts: list[str] = []
        for split in SPLITS:
            for ex in self.examples(n, seed=0, split=split):
                texts += [ex.prompt, self.training_text(ex), ex.counterfactual]
        return texts

    def training_text(self, ex: Example) -> str:
        """The text the model is trained on for ``ex``: prompt + answer + ending."""
        return ex.prompt + ex.answer + "."

    def accuracy(self, lm: Any, examples: list[Any]) -> float:
        """Top-1 accuracy of wrapped model ``lm`` on ``examples``: the next token
        after the prompt is the answer (tasks whose model writes first, such as
        ``reasoning``, override this).

        Example:
            >>> import attrlab as al
            >>> t = al.zoo.task("ioi")
            >>> 0.0 <= t.accuracy(al.zoo.load("ioi"), t.examples(5)) <= 1.0
            True
        """
        from .train import accuracy

        return accuracy(lm, examples)

    def training_stream(self, seed: int = 0) -> Iterator[tuple[str, str | None]]:
        """Endless ``(text, prompt)`` pairs to train on; ``prompt`` is the prefix
        whose next token is the answer (None when the whole text is plain LM data).

        Example:
            >>> import attrlab as al
            >>> text, prompt = next(al.zoo.task("ioi").training_stream())
            >>> text.startswith(prompt)
            True
        """
        chunk = 0
        while True:
            for ex in self.examples(256, seed=seed * 1_000_003 + chunk, split="train"):
                yield self.training_text(ex), ex.prompt
            chunk += 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
