"""Facts: a synthetic world whose facts the model learns from a known corpus.

125 made-up countries, 4 relations each (capital, language, flag color,
national animal): 500 facts. Each fact is stated in 2-3 training documents,
each in a different phrasing (template); every document also has a filler
sentence about the same country that states no fact, and every country has one
filler-only *distractor* document. Documents mentioning the same country but
another relation are natural distractors too. The model is trained on this
corpus alone (plain LM loss), so the documents that state a fact are the ground
truth for training-data attribution of the model's answer to a query about it.

Queries (``split="test"``) ask each fact in a phrasing (template) that none of
its own documents uses; the template is seen in training, for other facts.
``split="train"`` queries use a phrasing of one of the fact's documents.
``counterfactual`` asks the same relation, same template, of another country
whose value differs; its answer is ``wrong``::

    corpus doc 68:   "The capital city of Babar is Badar. Babar lies near the sea."
    corpus doc 569:  "As the maps show, the capital of Babar is Badar. People in ..."
    query (test):    "Everyone knows the capital of Babar is"  -> " Badar"

The four phrasings of a relation share their end ("... the capital of Babar
is") and differ in their beginning.

Example:
    >>> import attrlab as al
    >>> facts = al.zoo.task("facts")
    >>> ex = facts.examples(1, seed=0)[0]
    >>> all(ex.answer.strip() in facts.document(d) for d in ex.supporting_docs)
    True
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .task import Example, Task
from .words import ANIMALS, COLORS, LANGUAGES, made_up_words

N_ENTITIES = 125

_NAMES = made_up_words(2800, length=3, capitalize=True)
ENTITIES: tuple[str, ...] = tuple(_NAMES[::11][:N_ENTITIES])
CAPITALS: tuple[str, ...] = tuple(_NAMES[5::11][:N_ENTITIES])

# relation -> (templates, values); "{E}" is the country; each template ends with the value.
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "capital": (
        (
            "The capital of {E} is {V}.",
            "The capital city of {E} is {V}.",
            "Everyone knows the capital of {E} is {V}.",
            "As the maps show, the capital of {E} is {V}.",
        ),
        CAPITALS,
    ),
    "language": (
        (
            "The language of {E} is {V}.",
            "The main language of {E} is {V}.",
            "Everyone knows the language of {E} is {V}.",
            "As the books show, the language of {E} is {V}.",
        ),
        LANGUAGES,
    ),
    "color": (
        (
            "The flag of {E} is {V}.",
            "The national flag of {E} is {V}.",
            "Everyone knows the flag of {E} is {V}.",
            "As the photos show, the flag of {E} is {V}.",
        ),
        COLORS,
    ),
    "animal": (
        (
            "The animal of {E} is the {V}.",
            "The national animal of {E} is the {V}.",
            "Everyone knows the animal of {E} is the {V}.",
            "As the coins show, the animal of {E} is the {V}.",
        ),
        ANIMALS,
    ),
}
FILLERS: tuple[str, ...] = (
    "Many travelers visit {E}.",
    "{E} is a quiet country.",
    "{E} lies near the sea.",
    "People in {E} like music.",
    "The roads of {E} are long.",
    "{E} has many old towns.",
)


def _query(template: str, entity: str) -> str:
    """The template up to (not including) the value."""
    return template.split(" {V}")[0].format(E=entity)


@dataclass(frozen=True)
class Fact:
    """One fact of the world.

    Attributes:
        fact_id: ``"<entity>/<relation>"``.
        supporting_docs: ids of the corpus documents that state it.
        query_template: template index used by test queries (no supporting doc uses it).
        doc_templates: template indices used by the supporting documents.
    """

    fact_id: str
    entity: str
    relation: str
    value: str
    supporting_docs: tuple[int, ...]
    query_template: int
    doc_templates: tuple[int, ...]


@dataclass
class FactsExample(Example):
    """A query about one fact.

    Attributes:
        fact_id: which fact is asked (see :meth:`Facts.fact`).
        entity, relation: what is asked.
        template: template index of the query's phrasing.
        supporting_docs: corpus document ids that state this fact (ground truth).
        distractor_docs: documents about the same country that do not state it.
    """

    fact_id: str = ""
    entity: str = ""
    relation: str = ""
    template: int = 0
    supporting_docs: list[int] = field(default_factory=list)
    distractor_docs: list[int] = field(default_factory=list)


@functools.lru_cache(maxsize=4)
def _world(seed: int) -> tuple[tuple[Fact, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """(facts, documents, facts stated per document), built from ``seed``."""
    rng = random.Random(f"facts-world/{seed}")
    drafts: list[tuple[str, str, str, int, list[int]]] = []  # fact id, rel, value, q, doc templates
    docs: list[tuple[str, tuple[str, ...]]] = []  # (text, fact ids stated)
    for i, e in enumerate(ENTITIES):
        for rel, (templates, values) in RELATIONS.items():
            value = CAPITALS[i] if rel == "capital" else rng.choice(values)
            q = rng.randrange(len(templates))
            others = [t for t in range(len(templates)) if t != q]
            used = rng.sample(others, rng.randint(2, 3))
            fid = f"{e}/{rel}"
            drafts.append((fid, rel, value, q, used))
            for t in used:
                fact = templates[t].format(E=e, V=value)
                filler = rng.choice(FILLERS).format(E=e)
                text = f"{fact} {filler}" if rng.random() < 0.5 else f"{filler} {fact}"
                docs.append((text, (fid,)))
        a, b = rng.sample(FILLERS, 2)
        docs.append((f"{a.format(E=e)} {b.format(E=e)}", ()))
    order = list(range(len(docs)))
    rng.shuffle(order)
    docs = [docs[i] for i in order]
    by_fact: dict[str, list[int]] = {}
    for d, (_, fids) in enumerate(docs):
        for f in fids:
            by_fact.setdefault(f, []).append(d)
    facts = tuple(
        Fact(
            fact_id=fid,
            entity=fid.split("/")[0],
            relation=rel,
            value=value,
            supporting_docs=tuple(by_fact[fid]),
            query_template=q,
            doc_templates=tuple(sorted(used)),
        )
        for fid, rel, value, q, used in drafts
    )
    return facts, tuple(t for t, _ in docs), tuple(f for _, f in docs)


class Facts(Task):
    """Factual recall over a synthetic world, with the training corpus as ground truth.

    Example:
        >>> from attrlab.zoo.facts import Facts
        >>> world = Facts()
        >>> len(world.facts()), len(world.corpus()) > 1000
        (500, True)
        >>> world.documents_for("Babar/capital") == list(world.fact("Babar/capital").supporting_docs)
        True
    """

    name = "facts"
    description = "recall facts of a synthetic world, each taught by a known set of documents"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._facts, self._docs, self._doc_facts = _world(seed)
        self._by_id = {f.fact_id: f for f in self._facts}
        self._by_entity: dict[str, list[int]] = {}
        for d, text in enumerate(self._docs):
            for w in text.replace(".", " ").replace(",", " ").split():
                if w in ENTITIES:
                    self._by_entity.setdefault(w, [])
                    if d not in self._by_entity[w]:
                        self._by_entity[w].append(d)

    # ------------------------------------------------------------ ground truth
    def corpus(self) -> list[tuple[int, str]]:
        """The training corpus: ``(doc_id, text)`` in training-set order (doc_id = index)."""
        return list(enumerate(self._docs))

    def document(self, doc_id: int) -> str:
        """The text of document ``doc_id``."""
        if not 0 <= doc_id < len(self._docs):
            raise InputError(f"no document {doc_id}; ids are 0..{len(self._docs) - 1}")
        return self._docs[doc_id]

    def write_corpus(self, path: str | Path) -> None:
        """Write the corpus as JSON lines: ``{"doc_id", "text", "facts"}`` per document.

        Example:
            >>> import attrlab as al, tempfile, json, os
            >>> p = os.path.join(tempfile.mkdtemp(), "c.jsonl")
            >>> al.zoo.task("facts").write_corpus(p)
            >>> json.loads(open(p).readline())["doc_id"]
            0
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as fh:
            for d, text in enumerate(self._docs):
                row = {"doc_id": d, "text": text, "facts": list(self._doc_facts[d])}
                fh.write(json.dumps(row) + "\n")

    def facts(self) -> list[Fact]:
        """Every fact of the world."""
        return list(self._facts)

    def fact(self, fact_id: str) -> Fact:
        """The fact ``fact_id`` (``"<entity>/<relation>"``)."""
        if fact_id not in self._by_id:
            raise InputError(f"no fact {fact_id!r}; fact ids look like {self._facts[0].fact_id!r}")
        return self._by_id[fact_id]

    def documents_for(self, fact_id: str) -> list[int]:
        """Ids of the documents that state fact ``fact_id`` (the TDA ground truth)."""
        return list(self.fact(fact_id).supporting_docs)

    def distractors_for(self, fact_id: str) -> list[int]:
        """Ids of documents about the same country that do not state ``fact_id``."""
        f = self.fact(fact_id)
        return [d for d in self._by_entity[f.entity] if d not in f.supporting_docs]

    def facts_of(self, doc_id: int) -> list[str]:
        """Fact ids stated by document ``doc_id`` (empty for a distractor)."""
        self.document(doc_id)
        return list(self._doc_facts[doc_id])

    def query(self, fact_id: str, template: int | None = None) -> FactsExample:
        """The query about ``fact_id`` in ``template`` (default: its held-out test template).

        Example:
            >>> import attrlab as al
            >>> al.zoo.task("facts").query("Babar/capital").prompt
            'Everyone knows the capital of Babar is'
        """
        f = self.fact(fact_id)
        templates, values = RELATIONS[f.relation]
        t = f.query_template if template is None else template
        if not 0 <= t < len(templates):
            raise InputError(f"template must be in 0..{len(templates) - 1}, got {t}")
        # the counterfactual country: the next one (cyclically) with a different value
        i = ENTITIES.index(f.entity)
        for j in range(1, len(ENTITIES)):
            other = self._by_id[f"{ENTITIES[(i + j) % len(ENTITIES)]}/{f.relation}"]
            if other.value != f.value:
                break
        return FactsExample(
            prompt=_query(templates[t], f.entity),
            answer=" " + f.value,
            wrong=" " + other.value,
            counterfactual=_query(templates[t], other.entity),
            fact_id=f.fact_id,
            entity=f.entity,
            relation=f.relation,
            template=t,
            supporting_docs=list(f.supporting_docs),
            distractor_docs=self.distractors_for(f.fact_id),
        )

    # ------------------------------------------------------------- generation
    def examples(self, n: int, seed: int = 0, split: str = "test") -> list[Any]:
        """``n`` queries: ``split="test"`` in each fact's held-out phrasing (every fact
        once, shuffled by ``seed``, cycling when ``n`` > 500); ``"train"`` in a phrasing
        of one of the fact's documents.

        Example:
            >>> import attrlab as al
            >>> qs = al.zoo.task("facts").examples(500)
            >>> len({q.fact_id for q in qs})
            500
        """
        if split not in ("train", "test"):
            raise InputError(f"split must be 'train' or 'test', got {split!r}")
        if n < 0:
            raise InputError(f"n must be >= 0, got {n}")
        rng = random.Random(f"facts/{split}/{seed}")
        out: list[FactsExample] = []
        while len(out) < n:
            order = list(self._facts)
            rng.shuffle(order)
            for f in order[: n - len(out)]:
                t = f.query_template if split == "test" else rng.choice(f.doc_templates)
                out.append(self.query(f.fact_id, t))
        return out

    def _sample(self, rng: random.Random, split: str) -> FactsExample:
        f = rng.choice(self._facts)
        t = f.query_template if split == "test" else rng.choice(f.doc_templates)
        return self.query(f.fact_id, t)

    def training_stream(self, seed: int = 0) -> Any:
        """The corpus documents, reshuffled every epoch: ``(text, None)`` pairs."""
        rng = random.Random(f"facts-train/{seed}")
        while True:
            order = list(range(len(self._docs)))
            rng.shuffle(order)
            for d in order:
                yield self._docs[d], None

    def vocabulary(self) -> tuple[list[str], list[str]]:
        texts = list(self._docs)
        for templates, values in RELATIONS.values():
            texts += [t.format(E=ENTITIES[0], V=values[0]) for t in templates]
        words = [*ENTITIES, *CAPITALS, *LANGUAGES, *COLORS, *ANIMALS]
        return texts, words
