"""The model zoo: task generators, ground truth, bundled models and their accuracy."""

from __future__ import annotations

import doctest
import importlib
import json

import pytest
import torch

import attrlab as al
from attrlab.zoo.train import make_tokenizer

ALL = al.zoo.all_tasks()
BUNDLED = al.zoo.tasks()


@pytest.fixture(scope="module")
def lms():
    torch.set_num_threads(1)
    return {name: al.zoo.load(name) for name in BUNDLED}


# ------------------------------------------------------------------ generators
def test_task_names_and_errors():
    assert ALL == ["ioi", "induction", "facts", "context_qa", "reasoning"]
    assert set(BUNDLED) <= set(ALL)
    with pytest.raises(al.errors.InputError, match="no zoo task"):
        al.zoo.task("nope")
    with pytest.raises(al.errors.InputError, match="split"):
        al.zoo.task("ioi").examples(2, split="dev")


@pytest.mark.parametrize("name", ALL)
def test_generator_is_seeded_and_splits_are_disjoint(name):
    t = al.zoo.task(name)
    a = t.examples(50, seed=3)
    assert a == t.examples(50, seed=3)
    assert a != t.examples(50, seed=4)
    test_prompts = {e.prompt for e in t.examples(300, seed=0, split="test")}
    train_prompts = {e.prompt for e in t.examples(300, seed=0, split="train")}
    if name != "facts":  # facts: same fact, held-out phrasing (checked below)
        assert not test_prompts & train_prompts


@pytest.mark.parametrize("name", ALL)
def test_answers_are_single_tokens_and_counterfactuals_align(name):
    t = al.zoo.task(name)
    tok = make_tokenizer(name)
    for ex in t.examples(100, seed=1):
        assert ex.answer != ex.wrong and ex.answer.startswith(" ")
        for word in (ex.answer, ex.wrong, ex.answer.strip()):
            assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1
        p = tok(ex.prompt)["input_ids"]
        c = tok(ex.counterfactual)["input_ids"]
        assert len(p) == len(c) and p != c
        assert tok.unk_token_id not in p + c
        assert tok.decode(tok(ex.prompt, add_special_tokens=False)["input_ids"]) == ex.prompt


def test_ioi_ground_truth():
    tok = make_tokenizer("ioi")
    for ex in al.zoo.task("ioi").examples(100):
        words = ex.prompt.replace(",", " ").replace(".", " ").split()
        assert words.count(ex.s) == 2 and words.count(ex.io) == 1
        pieces = tok.convert_ids_to_tokens(tok(ex.prompt)["input_ids"])
        assert len(pieces) == 15 and pieces[ex.positions["END"]] == "Ġto"
        assert pieces[ex.positions["IO"]] == "Ġ" + ex.io
        assert pieces[ex.positions["S1"]] == pieces[ex.positions["S2"]] == "Ġ" + ex.s
        abc = ex.counterfactual_abc.replace(",", " ").replace(".", " ").split()
        assert ex.io not in abc and ex.s not in abc and len(abc) == len(words)
        cf = ex.counterfactual.replace(",", " ").replace(".", " ").split()
        assert cf.count(ex.io) == 2 and cf.count(ex.s) == 1


def test_ioi_layouts_vary():
    """Every template is drawn and the names move: S2 takes 4 positions, IO and S1
    several each, so a model cannot find the subject by its position."""
    from attrlab.zoo.ioi import TEMPLATES

    exs = al.zoo.task("ioi").examples(400, seed=0, split="train")
    assert len({ex.prompt.split()[0] for ex in exs}) >= 4
    assert {ex.positions["S2"] for ex in exs} == {p["S2"] for _, p in TEMPLATES} == {9, 10, 11, 12}
    assert len({ex.positions["IO"] for ex in exs}) >= 4
    assert {ex.positions["END"] for ex in exs} == {14}
    for ex in exs:  # the layout index names the template, hence the positions
        assert ex.positions["S2"] == TEMPLATES[ex.layout][1]["S2"]
        assert {ex.positions["IO"], ex.positions["S1"]} == {
            TEMPLATES[ex.layout][1]["A"],
            TEMPLATES[ex.layout][1]["B"],
        }


def test_induction_ground_truth():
    for ex in al.zoo.task("induction").examples(100):
        words = ex.prompt.split()
        assert words[ex.first_pos] == ex.answer.strip() == ex.sequence[ex.k]
        assert words[-ex.k :] == ex.sequence[: ex.k]
        assert ex.counterfactual.split()[ex.first_pos] == ex.wrong.strip()
        assert len(set(words)) == len(words) - ex.k  # only the repeat repeats


def test_context_qa_same_relation_variant():
    from attrlab.zoo.context_qa import ContextQA, parse_document

    for ex in ContextQA(same_relation=True).examples(100):
        rels = [parse_document(s)[1] for s in ex.sources]
        assert rels.count(ex.relation) >= 2
        assert [i for i, s in enumerate(ex.sources) if ex.answer.strip() in s] == [ex.gold]


def test_context_qa_ground_truth():
    from attrlab.zoo.context_qa import parse_document

    for ex in al.zoo.task("context_qa").examples(200):
        lines = ex.prompt.split("\n")
        assert lines[: len(ex.sources)] == ex.sources
        holders = [i for i, s in enumerate(ex.sources) if ex.answer.strip() in s.split(" ")[-1]]
        assert holders == [ex.gold]
        assert ex.person in ex.sources[ex.gold] and ex.person in ex.question
        assert sum(ex.person in s for s in ex.sources) == 1
        rels = [parse_document(s)[1] for s in ex.sources]
        assert len(set(rels)) == len(rels) and rels[ex.gold] == ex.relation
        assert ex.prompt.endswith(ex.sources[ex.gold].rsplit(" ", 1)[0])
        diff = [i for i, (a, b) in enumerate(zip(ex.sources, ex.counterfactual_sources)) if a != b]
        assert diff == [ex.gold] and ex.wrong.strip() in ex.counterfactual_sources[ex.gold]


def test_facts_ground_truth():
    from attrlab.zoo.facts import RELATIONS

    world = al.zoo.task("facts")
    corpus = world.corpus()
    assert [d for d, _ in corpus] == list(range(len(corpus)))
    stated = {}
    for f in world.facts():
        assert 2 <= len(f.supporting_docs) <= 3
        assert f.query_template not in f.doc_templates
        templates = RELATIONS[f.relation][0]
        for d in world.documents_for(f.fact_id):
            assert world.facts_of(d) == [f.fact_id]
            sentence = templates[0].replace("{E}", f.entity)  # any template contains E and V
            assert f.entity in corpus[d][1] and f.value in corpus[d][1], sentence
            stated.setdefault(d, []).append(f.fact_id)
        for d in world.distractors_for(f.fact_id):
            assert f.entity in corpus[d][1] and d not in f.supporting_docs
    distractors = [d for d, _ in corpus if not world.facts_of(d)]
    assert len(distractors) == len({f.entity for f in world.facts()})
    assert len(stated) + len(distractors) == len(corpus)
    qs = world.examples(500)
    assert len({q.fact_id for q in qs}) == 500
    for q in qs[:50]:
        f = world.fact(q.fact_id)
        assert q.template == f.query_template
        assert q.prompt not in " ".join(world.document(d) for d in f.supporting_docs)
    with pytest.raises(al.errors.InputError):
        world.documents_for("Nowhere/capital")


def test_facts_corpus_file_matches_generator():
    path = al.zoo.DATA_DIR / "facts_corpus.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    world = al.zoo.task("facts")
    assert [(r["doc_id"], r["text"]) for r in rows] == world.corpus()
    assert all(r["facts"] == world.facts_of(r["doc_id"]) for r in rows)


# ----------------------------------------------------------------------- models
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_loads_with_plain_transformers(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = al.zoo.model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ex = al.zoo.task(name).examples(1)[0]
    ids = tok(ex.prompt, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        pred = model(ids).logits[0, -1].argmax()
    # the reasoning model writes its trace first: its next token starts the trace
    first = " " + ex.steps[0].split()[0] if name == "reasoning" else ex.answer
    assert tok.decode([int(pred)]) == first
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_accuracy_on_500_held_out_prompts(name, lms):
    lm = lms[name]
    examples = al.zoo.task(name).examples(500, seed=0, split="test")
    task = al.zoo.task(name)
    assert task.accuracy(lm, examples) >= 0.95
    # the answer comes from the context: on the counterfactual the model follows it
    cf = [
        type(e)(**{**e.to_dict(), "prompt": e.counterfactual, "answer": e.wrong})
        for e in examples[:200]
    ]
    assert task.accuracy(lm, cf) >= 0.9


def test_every_task_has_a_bundled_model():
    assert BUNDLED == ALL


def test_token_forms(lms):
    lm = lms["ioi"]
    assert lm.token_id(" Mary") != lm.token_id("Mary")
    assert lm.name == "zoo/ioi" and lm.cfg.family == "gpt2"
    with pytest.raises(al.errors.InputError, match="not bundled|no zoo task"):
        al.zoo.load("nope")


def test_bundle_size():
    total = sum(p.stat().st_size for p in al.zoo.MODELS_DIR.rglob("*") if p.is_file())
    total += sum(p.stat().st_size for p in al.zoo.DATA_DIR.rglob("*") if p.is_file())
    assert total < 20e6


def test_train_smoke(tmp_path):
    from transformers import AutoModelForCausalLM

    from attrlab.zoo.train import train

    log = train("ioi", tmp_path, steps=2, progress=False, eval_examples=20)
    assert log["steps"] == 2 and (tmp_path / "training_log.json").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.n_layer == 2


@pytest.mark.parametrize(
    "module",
    [
        "attrlab.zoo",
        "attrlab.zoo.task",
        "attrlab.zoo.ioi",
        "attrlab.zoo.induction",
        "attrlab.zoo.facts",
        "attrlab.zoo.context_qa",
        "attrlab.zoo.tokenizer",
        "attrlab.zoo.words",
    ],
)
def test_zoo_doctests(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_ioi_model_reads_the_names(lms):
    """The IOI answer comes from attention to the names, not from a context-free shortcut."""
    lm = lms["ioi"]
    exs = al.zoo.task("ioi").examples(100, seed=5)
    logits, cache = lm.run([e.prompt for e in exs], cache=["blocks.0.attn.pattern"])
    pattern = cache["blocks.0.attn.pattern"]  # [batch, head, q, k]
    rows = torch.arange(len(exs))
    io = torch.tensor([e.positions["IO"] for e in exs])
    s1 = torch.tensor([e.positions["S1"] for e in exs])
    to_names = pattern[rows, :, 14, io] + pattern[rows, :, 14, s1]  # [batch, head]
    assert to_names.mean(0).max() > 0.5
    # with all names replaced (ABC), the IO-vs-S preference vanishes
    abc, _ = lm.run([e.counterfactual_abc for e in exs], last_only=True)
    io_ids = torch.tensor([lm.token_id(e.answer) for e in exs])
    s_ids = torch.tensor([lm.token_id(e.wrong) for e in exs])
    clean_diff = logits[rows, -1, io_ids] - logits[rows, -1, s_ids]
    abc_diff = abc[rows, -1, io_ids] - abc[rows, -1, s_ids]
    assert clean_diff.mean() > 5 and abc_diff.mean().abs() < clean_diff.mean() / 4
