"""Logit lens: the last layer equals the model's output; every layer equals the
final norm + unembedding applied by hand; ranks and top-k are consistent."""

from __future__ import annotations

import functools

import pytest
import torch

import attrlab as al
from attrlab.errors import InputError, MultiTokenTargetError

PROMPT = "When Mary and John went to the store, John gave a drink to"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


@functools.cache
def _lm(family: str) -> al.LM:
    return al.wrap(*al.testing.tiny_model(family, initializer_range=0.3))


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "llama", "gpt_neox"])
def test_last_layer_is_the_model_output(family: str) -> None:
    lm = _lm(family)
    V = lm.cfg.d_vocab
    r = al.logit_lens(lm, PROMPT, positions="all", k=V)
    logits, _ = lm.run(PROMPT)
    want = logits[0].float().log_softmax(-1)  # [pos, V]
    n_pos = want.shape[0]
    L = lm.cfg.n_layers
    last = slice(L * n_pos, (L + 1) * n_pos)
    ids, lp = r.extra["topk_ids"][last], r.extra["topk_logprobs"][last]
    got = torch.empty_like(want).scatter_(-1, ids, lp)
    assert torch.allclose(got, want, atol=1e-5)
    # target None = the model's own top prediction: rank 1 at the last layer
    assert r.extra["rank"][last].eq(1).all()
    assert torch.allclose(r.scores[last], want.max(-1).values, atol=1e-5)


def test_every_layer_matches_a_manual_lens() -> None:
    lm = _lm("gpt2")
    L = lm.cfg.n_layers
    r = al.logit_lens(lm, PROMPT, target=" Mary", k=3)
    assert r.units["layer"] == list(range(L + 1))
    assert r.units["site"][-1] == f"blocks.{L - 1}.resid_post"
    _, cache = lm.run(PROMPT, cache=[f"blocks.{i}.resid_pre" for i in range(L)])
    mary = lm.token_id(" Mary")
    ln = lm.adapter.final_norm()
    for layer in range(L):
        x = cache[f"blocks.{layer}.resid_pre"][0, -1]
        y = torch.nn.functional.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)
        lp = (y @ lm.W_U() + (lm.b_U() if lm.b_U() is not None else 0)).log_softmax(-1)
        assert r.scores[layer].item() == pytest.approx(lp[mary].item(), abs=1e-5)
        assert r.extra["rank"][layer].item() == int((lp > lp[mary]).sum()) + 1
        assert r.extra["topk_ids"][layer].tolist() == lp.topk(3).indices.tolist()
    df = r.to_pandas()
    assert list(df.columns) == ["layer", "site", "logprob", "rank", "top_tokens", "top_logprobs"]
    assert df.top_tokens[L] == lm.to_str_tokens(r.extra["topk_ids"][L])
    assert r.method == "logit_lens" and "Mary" in r.target


def test_positions_all_table_and_save(tmp_path) -> None:
    lm = _lm("llama")
    r = al.logit_lens(lm, PROMPT, positions="all", k=2)
    n_pos = len(lm.encode(PROMPT))
    assert len(r) == (lm.cfg.n_layers + 1) * n_pos
    df = r.to_pandas()
    assert {"layer", "position", "token", "logprob", "rank", "top_tokens"} <= set(df.columns)
    assert df.token.tolist()[:n_pos] == lm.to_str_tokens(lm.encode(PROMPT))
    back = al.Attribution.load(r.save(tmp_path / "lens.attr"))
    assert torch.equal(back.scores, r.scores) and torch.equal(back.extra["rank"], r.extra["rank"])


def test_bad_input() -> None:
    lm = _lm("gpt2")
    with pytest.raises(InputError, match="one prompt"):
        al.logit_lens(lm, [PROMPT, PROMPT])
    with pytest.raises(InputError, match="positions"):
        al.logit_lens(lm, PROMPT, positions="first")
    with pytest.raises(MultiTokenTargetError):
        al.logit_lens(lm, PROMPT, target=" Mary Smithson")
    with pytest.raises(InputError, match="single token"):
        al.logit_lens(lm, PROMPT, target=(" Mary", " John"))
    with pytest.raises(InputError, match="k must"):
        al.logit_lens(lm, PROMPT, k=0)
