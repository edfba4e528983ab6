"""Targets resolve tokens, validate them, and compute per-example values."""

from __future__ import annotations

import pytest
import torch

import attrlab as al
from attrlab import targets as T

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def lm():
    return al.wrap(*al.testing.tiny_model("gpt2"))


def _value(lm, target, prompts=PROMPT):
    t = T.resolve(target, lm)
    batch = t.prepare(lm, lm.tokenize(prompts))
    logits, _ = lm.run(batch)
    return t(logits, batch), logits, batch


def test_token_targets(lm):
    mary, john = lm.token_id(" Mary"), lm.token_id(" John")
    v, logits, _ = _value(lm, " Mary")
    assert v.item() == pytest.approx(logits[0, -1, mary].item())
    v, logits, _ = _value(lm, (" Mary", " John"))
    assert v.item() == pytest.approx((logits[0, -1, mary] - logits[0, -1, john]).item())
    v, logits, _ = _value(lm, T.LogProb(" Mary"))
    assert v.item() == pytest.approx(logits[0, -1].log_softmax(-1)[mary].item(), abs=1e-6)
    v, logits, _ = _value(lm, T.Prob(" Mary"))
    assert v.item() == pytest.approx(logits[0, -1].softmax(-1)[mary].item(), abs=1e-7)


def test_per_prompt_tokens_and_top(lm):
    prompts = [PROMPT, "When Mary went"]
    v, logits, _ = _value(lm, [" Mary", " John"], prompts)
    assert v.tolist() == pytest.approx(
        [logits[0, -1, lm.token_id(" Mary")].item(), logits[1, -1, lm.token_id(" John")].item()]
    )
    v, logits, _ = _value(lm, None, prompts)
    assert v.tolist() == pytest.approx(logits[:, -1].max(-1).values.tolist())


def test_continuation_logprob_matches_manual(lm):
    cont = " Mary and John"
    v, logits, batch = _value(lm, T.ContinuationLogProb(cont))
    ids = lm.encode(cont)
    full = lm.tokenize(PROMPT).input_ids[0].tolist() + ids
    assert batch.input_ids[0].tolist() == full
    logp = logits[0].log_softmax(-1)
    n0 = len(full) - len(ids)
    manual = sum(logp[n0 - 1 + i, t].item() for i, t in enumerate(ids))
    assert v.item() == pytest.approx(manual, abs=1e-5)
    rows, _, _ = _value(lm, T.ContinuationLogProb(cont, reduce="none"))
    assert rows.shape == (1, len(ids)) and rows.sum().item() == pytest.approx(manual, abs=1e-5)


def test_kl_zero_at_clean_and_callable(lm):
    v, _, _ = _value(lm, T.KL())
    assert abs(v.item()) < 1e-6
    v, logits, _ = _value(lm, lambda logits, batch: logits[:, -1, :3].sum(-1))
    assert v.item() == pytest.approx(logits[0, -1, :3].sum().item(), rel=1e-6)


def test_bad_targets(lm):
    with pytest.raises(al.errors.MultiTokenTargetError, match="ContinuationLogProb"):
        T.resolve(" Maryzzqx", lm)
    with pytest.raises(al.errors.TokenOutOfVocabError):
        T.resolve(10**7, lm)
    with pytest.raises(al.errors.InputError):
        T.resolve(3.5, lm)
    with pytest.raises(al.errors.EmptyPromptError):
        T.resolve(T.ContinuationLogProb(""), lm)


def test_float64_precision_is_kept():
    lm = al.wrap(*al.testing.tiny_model("llama", dtype=torch.float64))
    for target in (
        T.LogProb(" Mary"),
        T.Prob(" Mary"),
        T.ContinuationLogProb(" Mary went"),
        T.KL(),
    ):
        v, _, _ = _value(lm, target)
        assert v.dtype == torch.float64
