"""Context question answering: copy the answer from the one document that holds it.

The prompt is 3-5 short documents, one sentence per line, then a question
about one person and one relation; the answer is a word copied from exactly
one document (the gold one). The other documents are distractors: other
people, other relations (5 relations: city, pet, job, color, instrument),
other values. Values are drawn fresh for every prompt, so nothing can be
memorized::

    Anna likes the color red.
    Tom has a cat.
    Mia lives in Oslo.
    Ben works as a baker.
    Question: Where does Mia live?
    Answer: Mia lives in                       -> " Oslo"

The answer line restates the question ("Mia lives in"); the model finds the
document that continues it and copies the value. ``ContextQA(same_relation=True)``
generates a harder variant (a distractor with the same relation, so the person
must be matched); the bundled model is trained on the default variant.

``sources`` are the document strings (each a line of the prompt, in order),
``gold`` the index of the answering one. ``counterfactual`` replaces the value
in the gold document by another value of the same relation, so its answer is
``wrong``.

Example:
    >>> import attrlab as al
    >>> ex = al.zoo.task("context_qa").examples(1, seed=0)[0]
    >>> ex.answer.strip() in ex.sources[ex.gold]
    True
    >>> sum(ex.answer.strip() in s.rstrip(".").split() for s in ex.sources)
    1
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .task import Example, Task
from .words import CITIES, COLORS, INSTRUMENTS, JOBS, NAMES, PETS

# relation -> (document template, question template, values)
RELATIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "city": ("{P} lives in {V}.", "Where does {P} live?", CITIES),
    "pet": ("{P} has a {V}.", "What pet does {P} have?", PETS),
    "job": ("{P} works as a {V}.", "What is the job of {P}?", JOBS),
    "color": ("{P} likes the color {V}.", "What color does {P} like?", COLORS),
    "instrument": ("{P} plays the {V}.", "What does {P} play?", INSTRUMENTS),
}
QUESTION_PREFIX = "Question: "
ANSWER_PREFIX = "Answer:"


@dataclass
class ContextQAExample(Example):
    """A context-QA prompt.

    Attributes:
        sources: the documents, in prompt order (each is one line of the prompt).
        gold: index into ``sources`` of the document that answers the question.
        question: the question line (without the ``Question:`` prefix).
        person, relation: what is asked.
        counterfactual_sources: ``sources`` of the counterfactual prompt.
    """

    sources: list[str] = field(default_factory=list)
    gold: int = 0
    question: str = ""
    person: str = ""
    relation: str = ""
    counterfactual_sources: list[str] = field(default_factory=list)


def build_prompt(sources: list[str], question: str, answer_start: str = "") -> str:
    """The prompt made of ``sources`` (one per line), ``question`` and the start
    of the answer sentence.

    Example:
        >>> build_prompt(["Tom has a cat."], "What pet does Tom have?", "Tom has a")
        'Tom has a cat.\\nQuestion: What pet does Tom have?\\nAnswer: Tom has a'
    """
    tail = f" {answer_start}" if answer_start else ""
    return "\n".join(sources) + f"\n{QUESTION_PREFIX}{question}\n{ANSWER_PREFIX}{tail}"


class ContextQA(Task):
    """Questions answered by copying from one of 3-5 in-prompt documents.

    Example:
        >>> from attrlab.zoo.context_qa import ContextQA
        >>> ex = ContextQA().examples(1, seed=2)[0]
        >>> ex.prompt.splitlines()[ex.gold] == ex.sources[ex.gold]
        True
    """

    name = "context_qa"
    description = "copy the answer to a question from the one in-prompt document that holds it"

    def __init__(self, min_docs: int = 3, max_docs: int = 5, same_relation: bool = False):
        self.min_docs, self.max_docs = min_docs, max_docs
        self.same_relation = same_relation

    def _sample(self, rng: random.Random, split: str) -> ContextQAExample:
        n = rng.randint(self.min_docs, self.max_docs)
        people = rng.sample(NAMES, n)
        rels = list(RELATIONS)
        if self.same_relation:  # harder: a distractor shares the gold relation
            gold_rel = rng.choice(rels)
            doc_rels = [gold_rel, gold_rel] + [rng.choice(rels) for _ in range(n - 2)]
            rng.shuffle(doc_rels)
            gold = doc_rels.index(gold_rel) if rng.random() < 0.5 else _last(doc_rels, gold_rel)
        else:  # every document a different relation
            doc_rels = rng.sample(rels, n)
            gold = rng.randrange(n)
            gold_rel = doc_rels[gold]
        used: dict[str, set[str]] = {r: set() for r in rels}
        values: list[str] = []
        for r in doc_rels:
            v = rng.choice([x for x in RELATIONS[r][2] if x not in used[r]])
            used[r].add(v)
            values.append(v)
        new_value = rng.choice([x for x in RELATIONS[gold_rel][2] if x not in used[gold_rel]])
        sources = [RELATIONS[r][0].format(P=p, V=v) for r, p, v in zip(doc_rels, people, values)]
        cf_sources = list(sources)
        cf_sources[gold] = RELATIONS[gold_rel][0].format(P=people[gold], V=new_value)
        question = RELATIONS[gold_rel][1].format(P=people[gold])
        start = RELATIONS[gold_rel][0].split(" {V}")[0].format(P=people[gold])
        return ContextQAExample(
            prompt=build_prompt(sources, question, start),
            answer=" " + values[gold],
            wrong=" " + new_value,
            counterfactual=build_prompt(cf_sources, question, start),
            sources=sources,
            gold=gold,
            question=question,
            person=people[gold],
            relation=gold_rel,
            counterfactual_sources=cf_sources,
        )

    def vocabulary(self) -> tuple[list[str], list[str]]:
        texts = self.sample_texts()
        words = [*NAMES]
        for _, _, vals in RELATIONS.values():
            words.extend(vals)
        return texts, words

    def training_text(self, ex: Example) -> str:
        return ex.prompt + ex.answer + "."


def parse_document(doc: str) -> tuple[str, str, str]:
    """``(person, relation, value)`` of a document sentence.

    Example:
        >>> parse_document("Tom has a cat.")
        ('Tom', 'pet', 'cat')
    """
    words = doc.rstrip(".").split(" ")
    for rel, (template, _, _) in RELATIONS.items():
        if template.format(P=words[0], V=words[-1]) == doc:
            return words[0], rel, words[-1]
    raise ValueError(f"not a context_qa document: {doc!r}")


def _last(xs: list[str], x: str) -> int:
    return len(xs) - 1 - xs[::-1].index(x)
