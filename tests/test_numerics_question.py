"""Issue #14 items 3, 4, 7a, 8 (parts): non-finite numbers, the question a
result answers, randomization checks on every unit kind, option validation."""

from __future__ import annotations

import pytest
import torch

import attrlab as al
from attrlab.errors import InputError, NonFiniteError, QuestionMismatchError

P = "When Mary and John went"
OTHER = "When John and Mary went"  # same token length


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return al.wrap(*al.testing.tiny_model("gpt2"))


@pytest.fixture(scope="module")
def occ(lm):
    return al.attribute(lm, P, target=" to", method="occlusion")


# ------------------------------------------------------------- item 3: NaN
def test_nan_target_callable_raises_naming_the_target(lm):
    def bad(logits, batch):
        return logits[:, -1, 0] * float("nan")

    with pytest.raises(NonFiniteError, match=r"fn\(bad\)"):
        al.attribute(lm, P, target=bad, method="occlusion")
    with pytest.raises(NonFiniteError, match="inf"):
        al.attribute(lm, P, target=lambda lg, b: lg[:, -1, 0] + float("inf"), method="ig")


def test_nan_baseline_and_noise_raise(lm):
    d = lm.cfg.d_model
    with pytest.raises(NonFiniteError, match="baseline"):
        al.attribute(lm, P, " to", method="ig", baseline=torch.full((5, d), float("nan")))
    with pytest.raises(NonFiniteError, match="noise"):
        al.attribute(lm, P, " to", method="smoothgrad", noise=float("nan"))


def test_curves_refuse_non_finite_scores(lm, occ):
    bad = al.Attribution(
        torch.tensor([float("nan"), 1.0, 2.0, 3.0, 4.0]),
        units=occ.units,
        unit_kind="tokens",
        method="x",
        meta=occ.meta,
    )
    for fn in (
        al.evaluate.deletion_curve,
        al.evaluate.insertion_curve,
        al.evaluate.comprehensiveness,
        al.evaluate.sufficiency,
    ):
        with pytest.raises(NonFiniteError, match="non-finite|NaN"):
            fn(lm, bad, P, " to")
    with pytest.raises(NonFiniteError):
        al.evaluate.lds(lm, bad, P, " to", n_masks=4)


# ------------------------------------------------------- item 4: question
def test_evaluation_on_another_prompt_raises(lm, occ):
    with pytest.raises(QuestionMismatchError, match="prompt"):
        al.evaluate.lds(lm, occ, OTHER, " to", n_masks=8)
    with pytest.raises(QuestionMismatchError, match="prompt"):
        al.evaluate.deletion_curve(lm, occ, OTHER, " to")
    with pytest.raises(QuestionMismatchError, match="target"):
        al.evaluate.deletion_curve(lm, occ, P, " the")


def test_evaluation_reads_the_question_from_the_result(lm, occ):
    a = al.evaluate.deletion_curve(lm, occ)
    b = al.evaluate.deletion_curve(lm, occ, P, " to")
    c = al.evaluate.deletion_curve(lm, occ, lm.tokenize(P).input_ids, lm.token_id(" to"))
    assert a.values == b.values == c.values
    assert al.evaluate.lds(lm, occ, n_masks=8).lds == al.evaluate.lds(lm, occ, P, n_masks=8).lds


def test_question_survives_save_and_load(lm, occ, tmp_path):
    r = al.Attribution.load(occ.save(tmp_path / "r.attr"))
    assert al.evaluate.deletion_curve(lm, r).values == al.evaluate.deletion_curve(lm, occ).values
    with pytest.raises(QuestionMismatchError):
        al.evaluate.comprehensiveness(lm, r, OTHER)


# -------------------------------------------- item 7a: randomization check
@pytest.mark.parametrize(
    "units,method", [("heads", "patch"), ("heads", "atp"), ("heads", "dla"), ("edges", "eap")]
)
def test_randomization_check_on_components(lm, units, method):
    cf = None if method == "dla" else "a c c"
    r = al.attribute(lm, "a b c", target=" a", units=units, method=method, counterfactual=cf)
    c = al.evaluate.randomization_check(lm, r)
    assert c.randomized.unit_kind == units and c.randomized.scores.shape == r.scores.shape
    assert -1 <= c.spearman <= 1
    same = al.evaluate.randomization_check(lm, r, include=["nothing"])
    torch.testing.assert_close(same.randomized.scores, r.scores)


def test_randomization_check_on_sources_and_tokens():
    llama = al.wrap(*al.testing.tiny_model("llama"))
    r = al.attribute(llama, "A is red. B is blue.", " red", units="sources", method="occlusion")
    same = al.evaluate.randomization_check(llama, r, include=["nothing"])
    torch.testing.assert_close(same.randomized.scores, r.scores)
    t = al.attribute(llama, "A is red", target=None, method="ig", steps=4)
    same = al.evaluate.randomization_check(llama, t, include=["nothing"])
    torch.testing.assert_close(same.randomized.scores, t.scores)


def test_randomization_check_refuses_training_results(lm):
    r = al.Attribution(torch.ones(3), units={"index": [0, 1, 2]}, unit_kind="train", method="trak")
    with pytest.raises(InputError, match="training"):
        al.evaluate.randomization_check(lm, r)


# ------------------------------------------------ item 8: typed errors
@pytest.mark.parametrize(
    "method,opts,name",
    [
        ("lime", {"samples": -1}, "samples"),
        ("lime", {"kernel_width": 0}, "kernel_width"),
        ("kernelshap", {"samples": 0}, "samples"),
        ("occlusion", {"batch_size": 0}, "batch_size"),
        ("ig", {"batch_size": 0}, "batch_size"),
        ("smoothgrad", {"samples": float("inf")}, "samples"),
    ],
)
def test_numeric_options_validated_at_construction(method, opts, name):
    cls = al.methods.base.find_method(method, "tokens")
    with pytest.raises(InputError, match=name):
        cls(**opts)


def test_target_callable_of_wrong_length(lm):
    with pytest.raises(InputError, match="values for a batch"):
        al.attribute(lm, P, target=lambda lg, b: lg[:1, -1, 0], method="occlusion")
