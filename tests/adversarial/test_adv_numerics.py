"""Adversarial cases (area: numerics): non-finite inputs, targets, options and
scores; evaluation of the wrong question. Each case asserts a typed attrlab
error whose message names the culprit, or a correct result."""

from __future__ import annotations

import math

import pytest
import torch

import attrlab as al
from attrlab.errors import InputError, NonFiniteError, QuestionMismatchError

P = "When Mary and John went"
OTHER = "When John and Mary went"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return al.wrap(*al.testing.tiny_model("gpt2"))


@pytest.fixture(scope="module")
def occ(lm):
    return al.attribute(lm, P, target=" to", method="occlusion")


def _nan_result(occ):
    s = occ.scores.clone()
    s[1] = NAN
    return al.Attribution(s, units=occ.units, unit_kind="tokens", method="x", meta=occ.meta)


ERRORS = [
    # (id, call(lm, occ), error type, text the message must contain)
    (
        "fn-nan",
        lambda lm, r: al.attribute(lm, P, lambda lg, b: lg[:, -1, 0] * NAN, method="occlusion"),
        NonFiniteError,
        "fn(",
    ),
    (
        "fn-inf",
        lambda lm, r: al.attribute(lm, P, lambda lg, b: lg[:, -1, 0] + INF, method="ig", steps=2),
        NonFiniteError,
        "inf",
    ),
    (
        "fn-neg-inf-saliency",
        lambda lm, r: al.attribute(lm, P, lambda lg, b: lg[:, -1, 0] - INF, method="saliency"),
        NonFiniteError,
        "target",
    ),
    (
        "fn-wrong-length",
        lambda lm, r: al.attribute(lm, P, lambda lg, b: lg[:1, -1, 0], method="occlusion"),
        InputError,
        "callable",
    ),
    (
        "fn-2d",
        lambda lm, r: al.attribute(lm, P, lambda lg, b: lg[:, -1, :2], method="occlusion"),
        InputError,
        "1-D",
    ),
    (
        "ig-nan-baseline",
        lambda lm, r: al.attribute(
            lm, P, " to", method="ig", baseline=torch.full((5, lm.cfg.d_model), NAN)
        ),
        NonFiniteError,
        "baseline",
    ),
    (
        "occlusion-inf-baseline",
        lambda lm, r: al.attribute(
            lm, P, " to", method="occlusion", baseline=torch.full((5, lm.cfg.d_model), INF)
        ),
        NonFiniteError,
        "baseline",
    ),
    (
        "eg-nan-ablation",
        lambda lm, r: al.attribute(
            lm,
            P,
            " to",
            method="expected-gradients",
            ablation=al.ablations.Token(torch.full((5, lm.cfg.d_model), NAN)),
        ),
        NonFiniteError,
        "baseline",
    ),
    (
        "lds-nan-mask-baseline",
        lambda lm, r: al.evaluate.lds(
            lm, r, baseline=torch.full((5, lm.cfg.d_model), NAN), n_masks=4
        ),
        NonFiniteError,
        "baseline",
    ),
    (
        "smoothgrad-noise-nan",
        lambda lm, r: al.attribute(lm, P, " to", method="smoothgrad", noise=NAN),
        NonFiniteError,
        "noise",
    ),
    (
        "smoothgrad-noise-neg",
        lambda lm, r: al.attribute(lm, P, " to", method="smoothgrad", noise=-0.1),
        InputError,
        "noise",
    ),
    (
        "ig-steps-inf",
        lambda lm, r: al.attribute(lm, P, " to", method="ig", steps=INF),
        InputError,
        "steps",
    ),
    (
        "ig-steps-zero",
        lambda lm, r: al.attribute(lm, P, " to", method="ig", steps=0),
        InputError,
        "steps",
    ),
    (
        "lime-samples-neg",
        lambda lm, r: al.attribute(lm, P, " to", method="lime", samples=-1),
        InputError,
        "samples",
    ),
    (
        "lime-width-zero",
        lambda lm, r: al.attribute(lm, P, " to", method="lime", kernel_width=0),
        InputError,
        "kernel_width",
    ),
    (
        "lime-width-nan",
        lambda lm, r: al.attribute(lm, P, " to", method="lime", kernel_width=NAN),
        NonFiniteError,
        "kernel_width",
    ),
    (
        "kernelshap-samples-zero",
        lambda lm, r: al.attribute(lm, P, " to", method="kernelshap", samples=0),
        InputError,
        "samples",
    ),
    (
        "shapley-permutations-float",
        lambda lm, r: al.attribute(lm, P, " to", method="shapley", permutations=2.5),
        InputError,
        "permutations",
    ),
    (
        "occlusion-batch-zero",
        lambda lm, r: al.attribute(lm, P, " to", method="occlusion", batch_size=0),
        InputError,
        "batch_size",
    ),
    (
        "saliency-batch-bool",
        lambda lm, r: al.attribute(lm, P, " to", method="saliency", batch_size=True),
        InputError,
        "batch_size",
    ),
    (
        "patch-batch-zero",
        lambda lm, r: al.attribute(
            lm, "a b c", " a", units="heads", method="patch", counterfactual="a c c", batch_size=0
        ),
        InputError,
        "batch_size",
    ),
    (
        "patch-noise-scale-nan",
        lambda lm, r: al.attribute(
            lm, "a b c", " a", units="resid", method="patch", corruption="noise", noise_scale=NAN
        ),
        NonFiniteError,
        "noise_scale",
    ),
    (
        "atp*-delta-inf",
        lambda lm, r: al.attribute(
            lm, "a b c", " a", units="heads", method="atp*", counterfactual="a c c", delta=INF
        ),
        NonFiniteError,
        "delta",
    ),
    (
        "eap-ig-steps-neg",
        lambda lm, r: al.attribute(
            lm, "a b c", " a", units="edges", method="eap-ig", counterfactual="a c c", steps=-2
        ),
        InputError,
        "steps",
    ),
    (
        "contextcite-batch-zero",
        lambda lm, r: al.attribute(
            lm, "A is red. B is blue.", " red", units="sources", method="contextcite", batch_size=0
        ),
        InputError,
        "batch_size",
    ),
    (
        "contextcite-keep-prob-nan",
        lambda lm, r: al.attribute(
            lm, "A is red. B is blue.", " red", units="sources", method="contextcite", keep_prob=NAN
        ),
        NonFiniteError,
        "keep_prob",
    ),
    (
        "deletion-nan-scores",
        lambda lm, r: al.evaluate.deletion_curve(lm, _nan_result(r)),
        NonFiniteError,
        "NaN or infinite",
    ),
    (
        "insertion-nan-scores",
        lambda lm, r: al.evaluate.insertion_curve(lm, _nan_result(r)),
        NonFiniteError,
        "NaN or infinite",
    ),
    (
        "lds-nan-scores",
        lambda lm, r: al.evaluate.lds(lm, _nan_result(r), n_masks=4),
        NonFiniteError,
        "NaN or infinite",
    ),
    (
        "comprehensiveness-nan-scores",
        lambda lm, r: al.evaluate.comprehensiveness(lm, _nan_result(r)),
        NonFiniteError,
        "NaN or infinite",
    ),
    (
        "deletion-steps-zero",
        lambda lm, r: al.evaluate.deletion_curve(lm, r, steps=0),
        InputError,
        "steps",
    ),
    (
        "lds-other-prompt",
        lambda lm, r: al.evaluate.lds(lm, r, OTHER, " to", n_masks=4),
        QuestionMismatchError,
        "prompt",
    ),
    (
        "deletion-other-prompt",
        lambda lm, r: al.evaluate.deletion_curve(lm, r, OTHER, " to"),
        QuestionMismatchError,
        "prompt",
    ),
    (
        "sufficiency-other-target",
        lambda lm, r: al.evaluate.sufficiency(lm, r, P, " the"),
        QuestionMismatchError,
        "target",
    ),
    (
        "lds-other-units",
        lambda lm, r: al.evaluate.lds(lm, r, units="words", n_masks=4),
        QuestionMismatchError,
        "units",
    ),
    (
        "randomization-other-prompt",
        lambda lm, r: al.evaluate.randomization_check(lm, r, OTHER),
        QuestionMismatchError,
        "prompt",
    ),
]


@pytest.mark.parametrize("call,err,text", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_typed_error(lm, occ, call, err, text):
    with pytest.raises(err) as info:
        call(lm, occ)
    assert text in str(info.value)


def test_consistent_forms_give_the_same_curve(lm, occ):
    """Oracle: prompt as text or ids, target as text or id, or read from the result."""
    ref = al.evaluate.deletion_curve(lm, occ, P, " to").values
    assert al.evaluate.deletion_curve(lm, occ).values == ref
    ids = lm.tokenize(P).input_ids
    assert al.evaluate.deletion_curve(lm, occ, ids, lm.token_id(" to")).values == ref
    assert all(math.isfinite(v) for v in ref)


def test_edges_lds_reads_the_counterfactual(lm):
    r = al.attribute(lm, "a b c", " a", units="edges", method="eap", counterfactual="a c c")
    s = al.evaluate.lds(lm, r, n_masks=4)
    assert s.values.shape == (4,) and bool(torch.isfinite(s.values).all())
    with pytest.raises(QuestionMismatchError, match="counterfactual"):
        al.evaluate.lds(lm, r, counterfactual="a b b", n_masks=4)
