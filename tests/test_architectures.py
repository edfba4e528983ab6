"""The method x architecture matrix: every registered method (one representative
unit kind each, plus the lens and graph functions) on a tiny random model of
every family in ``al.testing.FAMILIES``.

Each cell (``attrlab.architectures``) either passes — finite scores of the right
shape and the method's own invariant (DLA sums, IG / EAP-IG / AttnLRP
completeness, exact Shapley efficiency, patching one head equals the hand patch
through ``lm.run(interventions=...)``, the logit lens' last layer equals the
model's log-probability) — or attrlab refuses it with a typed error that says
why. Anything else (``AttributeError``, a torch shape error, NaN, a broken
invariant) fails the test with its traceback. ``docs/architectures.md`` is the
rendered table of the outcomes; the last test checks it is current.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attrlab import architectures as A
from attrlab.targets import resolve
from attrlab.testing import FAMILIES

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

METHODS = [c.method for c in A.CELLS]
#: families on which every cell must pass: a refusal there means the cell's
#: inputs are wrong, not that the architecture cannot support the method
REFERENCE = ("gpt2", "llama")
DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"

OUTCOMES: dict[tuple[str, str], A.Outcome] = {}

#: crashes the matrix found whose fix belongs outside the model layer (strict: a
#: fixed one fails here, so that its entry is removed)
KNOWN: dict[tuple[str, str], str] = {}


def test_every_registered_method_has_a_cell():
    assert A.missing_methods() == [], "add a Cell for it in attrlab/architectures.py"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cell_passes_or_is_refused_with_a_reason(request, family, method):
    if (family, method) in KNOWN:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN[(family, method)]))
    try:
        outcome = A.run_cell(family, method, reraise=True)  # a crash raises here
    except Exception as e:
        OUTCOMES[(family, method)] = A.Outcome(family, method, "fail", A.failure_reason(e))
        raise
    OUTCOMES[(family, method)] = outcome
    if outcome.status == "refuse":
        assert family not in REFERENCE, outcome.reason
        _, _, message = outcome.reason.partition(": ")
        assert len(message.split()) >= 4, f"a refusal must say why: {outcome.reason!r}"


def test_docs_table_is_current():
    """Regenerate-and-compare: the outcomes above (cells that did not run in this
    session, e.g. under ``-k``, are run now) rendered as ``docs/architectures.md``."""
    outcomes = [OUTCOMES.get((f, m)) or A.run_cell(f, m) for f in FAMILIES for m in METHODS]
    assert DOC.exists() and DOC.read_text() == A.render(outcomes), (
        f"docs/architectures.md is stale: run {A.COMMAND}"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_caching_sites_in_a_grad_run_leaves_the_gradients_unchanged(family):
    """Reading a site must not change the gradient of anything upstream of it:
    on Granite (multipliers outside the modules) a cached ``mlp.out`` used to
    send the gradient to the MLP twice (EAP's closed form then disagreed with
    autograd and EAP-IG missed completeness)."""
    lm = A.model(family)
    target = resolve(A.TARGET, lm)
    batch = lm.tokenize(A.PROMPT)
    L = lm.cfg.n_layers
    read = ["unembed", *[f"blocks.{i}.{s}" for i in range(L) for s in ("mlp.out", "attn.out")]]

    def grad_at_embed(extra):
        with torch.enable_grad():
            logits, cache = lm.run(batch, cache=["blocks.0.resid_pre", *extra], grad=True)
            (g,) = torch.autograd.grad(target(logits, batch).sum(), cache["blocks.0.resid_pre"])
        return g

    torch.testing.assert_close(grad_at_embed(read), grad_at_embed([]))
