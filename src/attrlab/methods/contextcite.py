"""ContextCite's response spans: attribute part of a response again, from a
ContextCite result, without new forwards.

ContextCite ("ContextCite: Attributing Model Generation to Context") is the
``contextcite`` preset of the one linear surrogate
(:class:`attrlab.methods.surrogate.ContextCiteSurrogate`) on the sources'
``f`` (:class:`attrlab.units.sources.SourcesBound`): random masks keep every
source with probability 1/2, and a Lasso maps them to the response's log-odds.
Its result keeps the masks and the per-token log-probabilities
(``r.extra["masks"]``, ``r.extra["logprobs"]``), so :func:`attribute_span`
refits the surrogate to any part of the response, also after ``r.save`` /
``Attribution.load``.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("llama"))
    >>> ctx = "Paris is in France. Rome is in Italy. Bob likes tea."
    >>> r = al.attribute(lm, ctx, " France", units="sources", method="contextcite",
    ...                  query="Where is Paris?", samples=16)
    >>> list(r.top(2).columns)
    ['source', 'text', 'score']
    >>> attribute_span(r, 0, 1).scores.shape
    torch.Size([3])
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..result import Attribution
from ..units.sources import reduce_logprobs
from .surrogate import ContextCiteSurrogate

__all__ = ["attribute_span"]


def _fit(
    surrogate: ContextCiteSurrogate, masks: torch.Tensor, per_token: torch.Tensor,
    start: int, end: int, output: str,
) -> tuple[np.ndarray, float]:  # fmt: skip
    """The surrogate fitted to the response tokens ``[start, end)``: ``(weights [n], bias)``."""
    y = reduce_logprobs(per_token[:, start:end], output)  # [n_masks]
    w, b, _ = surrogate.fit(masks.bool(), y.double()[:, None], n_tokens=end - start)
    return w[0], float(b[0])


def _token_range_of_text(r: Attribution, text: str) -> tuple[int, int]:
    tokens: list[str] = r.meta["response_tokens"]
    response = "".join(tokens)
    a = response.find(text)
    if a < 0:
        raise InputError(f"{text!r} is not part of the response {response!r}")
    b = a + len(text)
    ends = np.cumsum([len(t) for t in tokens])
    starts = ends - np.array([len(t) for t in tokens])
    idx = [i for i in range(len(tokens)) if starts[i] < b and ends[i] > a]
    return idx[0], idx[-1] + 1


def attribute_span(
    r: Attribution,
    start: int | None = None,
    end: int | None = None,
    text: str | None = None,
    alpha: float | None = None,
    output: str | None = None,
) -> Attribution:
    """Attribute part of the response, from a ContextCite result, without new forwards.

    Args:
        r: a result of ``method="contextcite"`` on sources (also one loaded from disk).
        start, end: response token range ``[start, end)`` (default: all).
        text: instead of a token range, a piece of the response text.
        alpha, output: override the surrogate's settings.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "A is red. B is blue.", " red and blue", units="sources",
        ...                  method="contextcite", samples=8)
        >>> attribute_span(r, text="blue").meta["span_text"]
        ' blue'
    """
    if "masks" not in r.extra or "logprobs" not in r.extra:
        raise InputError("attribute_span needs a contextcite result (with masks and log-probs)")
    per_token = r.extra["logprobs"].double()
    n = per_token.shape[1]
    if text is not None:
        if start is not None or end is not None:
            raise InputError("give either start/end or text")
        start, end = _token_range_of_text(r, text)
    start = 0 if start is None else start
    end = n if end is None else end
    if start < 0:
        start += n
    if end < 0:
        end += n
    if not 0 <= start < end <= n:
        raise InputError(f"token range [{start}, {end}) is not inside the response (0..{n})")
    alpha = float(r.params.get("alpha", 0.01)) if alpha is None else alpha
    output = str(r.meta.get("output", "logit_prob")) if output is None else output
    surrogate = ContextCiteSurrogate(alpha=alpha, holdout=0.0)
    w, b = _fit(surrogate, r.extra["masks"].bool(), per_token, start, end, output)
    tokens = r.meta.get("response_tokens", [])
    piece = "".join(tokens[start:end])
    return Attribution(
        torch.as_tensor(w, dtype=torch.float64),
        units=r.units,
        unit_kind=r.unit_kind,
        method=r.method,
        target=f"response_{output}({piece!r})",
        params={**r.params, "alpha": alpha},
        model_id=r.model_id,
        diagnostics={"intercept": b},
        meta={**r.meta, "output": output, "span": [start, end], "span_text": piece},
        extra=r.extra,
    )
