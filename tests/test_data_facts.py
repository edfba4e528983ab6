"""TRAK on the zoo facts model: the documents that state a fact rank high for its held-out query."""

from __future__ import annotations

import random

import pytest

import attrlab as al
import attrlab.data as ad

N_QUERIES, N_OTHER_DOCS, DIM = 20, 60, 256


@pytest.fixture(scope="module")
def facts_setup(tmp_path_factory):
    lm = al.zoo.load("facts")
    task = al.zoo.task("facts")
    queries = task.examples(
        N_QUERIES, seed=0, split="test"
    )  # phrasings no supporting document uses
    keep: set[int] = set()
    for q in queries:  # every document about the queried countries (supporting and distractors) ...
        keep |= set(q.supporting_docs) | set(q.distractor_docs)
    rest = [d for d, _ in task.corpus() if d not in keep]  # ... and a random sample of the others
    keep |= set(random.Random(0).sample(rest, N_OTHER_DOCS))
    ids = sorted(keep)
    data = ad.Examples.from_texts(lm, [task.document(i) for i in ids], ids=ids)
    # the last transformer block, TRAK's margin output for LMs (the default)
    store = ad.featurize(
        lm,
        data,
        tmp_path_factory.mktemp("facts"),
        proj_dim=DIM,
        batch_size=64,
        modules=["transformer.h.1"],
    )
    return lm, queries, store


def test_supporting_documents_in_trak_top10(facts_setup):
    lm, queries, store = facts_setup
    r = al.attribute(
        lm,
        [q.prompt for q in queries],
        target=[q.answer for q in queries],
        units=al.units.TrainingExamples(store),
        method="trak",
        reg=1.0,
    )
    assert r.scores.shape == (N_QUERIES, store.n)
    any_hit, all_hit = [], []
    for i, q in enumerate(queries):
        top = set(r.top(10, by="pos", row=i)["id"])
        any_hit.append(any(d in top for d in q.supporting_docs))
        all_hit.append(all(d in top for d in q.supporting_docs))
    assert sum(any_hit) / N_QUERIES >= 0.8, any_hit  # a stating document in the top 10
    assert sum(all_hit) / N_QUERIES >= 0.6, all_hit  # every stating document in the top 10
