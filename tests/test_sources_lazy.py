"""Sources methods validate token counts before building ablated prompts, and build
them a batch at a time (issue 14, item 5)."""

from __future__ import annotations

import pytest
import torch

import attrlab as al
from attrlab.methods.context_baselines import loo_masks

METHODS = ["occlusion", "jsd", "attention", "hierarchical", "contextcite"]


def _context(n: int) -> str:
    return " ".join(f"Fact {i} is red." for i in range(n))


class _Counter:
    """Counts forwards of a model and the texts its tokenizer is called on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, lm: al.LM):
        self.forwards = 0
        self.calls: list[int] = []  # texts per tokenizer call
        model_forward = lm.model.forward

        def forward(*args, **kwargs):
            self.forwards += 1
            return model_forward(*args, **kwargs)

        monkeypatch.setattr(lm.model, "forward", forward)
        tok_call = type(lm.tokenizer).__call__

        def call(tok, text=None, *args, **kwargs):
            self.calls.append(len(text) if isinstance(text, (list, tuple)) else 1)
            return tok_call(tok, text, *args, **kwargs)

        monkeypatch.setattr(type(lm.tokenizer), "__call__", call)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("response", [" Fact", None])
def test_too_long_context_fails_before_any_ablation_or_forward(monkeypatch, method, response):
    """300 sources (~1,500 tokens) on a 128-token model: a ContextTooLongError that
    names the sizes, raised after tokenizing the full prompt only (not 301 ablated
    prompts) and before any forward (also before generating a response)."""
    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    count = _Counter(monkeypatch, lm)
    with pytest.raises(al.errors.ContextTooLongError, match="300 sources") as e:
        al.attribute(lm, _context(300), response, units="sources", method=method)
    assert "128" in str(e.value) and "fewer or shorter sources" in str(e.value)
    assert count.forwards == 0
    assert sum(count.calls) <= 2, count.calls


_plain = al.testing.plain_response_logprobs


LETTERS = " ".join(f"x{chr(97 + i % 26)}." for i in range(70))


@pytest.mark.parametrize("batch_size", ["auto", 1])
def test_ablated_prompts_are_built_a_batch_at_a_time(monkeypatch, batch_size):
    """Leave-one-out over 70 sources tokenizes at most 64 prompts per call (the
    lengths first, then each batch as it runs), and gives the plain runs' scores."""
    lm = al.wrap(*al.testing.tiny_model("llama", max_position_embeddings=512))
    p = al.units.Sources().prompt(lm, LETTERS, " xa. xb")
    masks = loo_masks(p.n_sources)
    count = _Counter(monkeypatch, lm)
    r = al.attribute(
        lm, LETTERS, " xa. xb", units="sources", method="occlusion", batch_size=batch_size
    )
    assert max(count.calls) <= 64 and sum(count.calls) >= 2 * 71
    f = _plain(lm, p, masks).sum(-1)
    torch.testing.assert_close(r.scores, f[0] - f[1:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk", range(2, 9))
def test_prefix_walk_with_chunked_prefill_over_the_response(chunk):
    """A prompt longer than the prefill chunk whose response positions straddle two
    chunks: the walk keeps every response position (it raised a size mismatch)."""
    from attrlab.model.prefixes import PrefixRunner as _Runner
    from attrlab.units.sources import _token_logprobs

    lm = al.wrap(*al.testing.tiny_model("llama"))
    p = al.units.Sources().prompt(lm, "A b c. D e f. G h i.", " A b c d e")
    masks = loo_masks(p.n_sources)
    runner = _Runner(lm, lm.cfg.n_ctx, chunk=chunk)
    got = runner.run(p.prompt_ids(masks), p.response_ids, _token_logprobs(p.response_ids), 1)
    torch.testing.assert_close(torch.stack(got), _plain(lm, p, masks), atol=2e-5, rtol=0)
