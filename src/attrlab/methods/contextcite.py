"""ContextCite: attribute a response to the sources of its context with a sparse
linear surrogate ("ContextCite: Attributing Model Generation to Context").

The surrogate is the ``contextcite`` preset of the one linear surrogate
(:class:`attrlab.methods.surrogate.ContextCiteSurrogate`: each of
``n_ablations`` random masks keeps every source with probability ``keep_prob``
= 1/2, a Lasso on standardized masks); what is specific to sources is what it
is fitted to. The response's per-token log-probabilities under every ablated
context are computed once (see :mod:`attrlab.units.sources` for how the
forwards share work), and the surrogate maps masks to the response's log-odds
(per-token penalty: the outputs are divided by the response length). The
weights are the scores: how much the response's log-odds drop when a source
is removed. The diagnostics report the fit's R^2 (in sample).

The masks and the per-token log-probabilities are kept in the result
(``r.extra["masks"]``, ``r.extra["logprobs"]``), so :func:`attribute_span`
attributes any part of the response without new forwards, also after
``r.save`` / ``Attribution.load``.

How options are split: the unit object (:class:`attrlab.units.Sources`) says
how the context is cut and how the prompt is built (``sources``, ``split``,
``query``, ``template``, ``chat_template``); the response is the target
(``target="..."``, ``al.targets.ContinuationLogProb(...)``, or ``response=``;
generated greedily when absent); the method's own options say how to estimate
(``n_ablations``, ``seed`` …). For convenience every method for
``units="sources"`` also accepts ``sources=``, ``split=``, ``query=``,
``template=`` and ``chat_template=`` and passes them on to the unit object.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("llama"))
    >>> ctx = "Paris is in France. Rome is in Italy. Bob likes tea."
    >>> r = al.attribute(lm, ctx, units="sources", method="contextcite",
    ...                  query="Where is Paris?", response=" France", n_ablations=16)
    >>> list(r.top(2).columns)
    ['source', 'text', 'score']
    >>> attribute_span(r, 0, 1).scores.shape
    torch.Size([3])
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..result import Attribution
from ..targets import ContinuationLogProb
from ..units.sources import SourcePrompt, Sources, reduce_logprobs
from .base import Method, check_float, check_int, register
from .surrogate import ContextCiteSurrogate, fit_lasso, sample_masks

__all__ = ["ContextMethod", "ContextCite", "attribute_span", "fit_lasso", "random_masks"]


def random_masks(n: int, n_sources: int, keep_prob: float = 0.5, seed: int = 0) -> Tensor:
    """``[n, n_sources]`` bool masks, each source kept with probability ``keep_prob``
    (the shared surrogate's :func:`~attrlab.methods.surrogate.sample_masks`).

    Example:
        >>> random_masks(4, 3, seed=1).shape
        torch.Size([4, 3])
    """
    return sample_masks(n, n_sources, keep_prob, seed, "bernoulli")


class ContextMethod(Method):
    """Shared options and plumbing of the methods for ``units="sources"``.

    Args:
        response: the response to explain (text or token ids); also accepted as
            ``target=``. None: generate it from the full prompt.
        sources, split, query, template, chat_template: passed on to
            :class:`attrlab.units.Sources`.
        max_new_tokens, do_sample: generation of the response when not given
            (greedy by default; sampling is seeded by ``seed``).
        seed: seeds the masks and any sampling.
        batch_size: prompts per forward; ``"auto"``: up to 64 prompts (8192
            tokens) in length-sorted batches; 1 walks the prefix tree of the prompts.
        progress: show a progress bar.

    Example:
        >>> issubclass(ContextCite, ContextMethod)
        True
    """

    target_kind = "raw"

    def __init__(
        self,
        *,
        response: str | Sequence[int] | None = None,
        sources: Sequence[Any] | None = None,
        split: str | None = None,
        query: str | None = None,
        template: str | None = None,
        chat_template: bool | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        seed: int = 0,
        batch_size: int | str = "auto",
        progress: bool = False,
    ):
        self.response = (
            list(response) if response is not None and not isinstance(response, str) else response
        )
        self.sources = list(sources) if sources is not None else None
        self.split = split
        self.query = query
        self.template = template
        self.chat_template = chat_template
        name = self.name or type(self).__name__
        self.max_new_tokens = check_int(name, "max_new_tokens", max_new_tokens)
        self.do_sample = bool(do_sample)
        self.seed = check_int(name, "seed", seed, minimum=0)
        if batch_size != "auto" and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise InputError(
                f"{name}: batch_size must be a positive int or 'auto', got {batch_size!r}"
            )
        self.batch_size = batch_size
        self.progress = progress

    # -------------------------------------------------------------- helpers
    def prepare(
        self, lm: Any, inputs: Any, target: Any, units: Any
    ) -> tuple[Sources, SourcePrompt]:
        """The unit object with this method's overrides, bound to the context and response."""
        if not isinstance(units, Sources):
            raise InputError(f"{self.name} needs units='sources', got {units!r}")
        units = units.updated(
            sources=self.sources,
            split=self.split,
            query=self.query,
            template=self.template,
            chat_template=self.chat_template,
        )
        if isinstance(target, ContinuationLogProb):
            target = target.continuation
        if target is not None and self.response is not None:
            raise InputError("the response is given twice (target= and response=); give it once")
        response = target if target is not None else self.response
        if response is not None and not isinstance(response, str):
            if isinstance(response, Tensor):
                response = response.reshape(-1).tolist()
            if not all(isinstance(t, (int, np.integer)) for t in response):
                raise InputError(
                    "the target of a sources attribution is the response: text, token ids or "
                    "al.targets.ContinuationLogProb"
                )
        prompt = units.bind(lm, inputs, response, self.max_new_tokens, self.do_sample, self.seed)
        return units, prompt

    def _run_logprobs(self, prompt: SourcePrompt, masks: Tensor, stats: dict[str, int]) -> Tensor:
        return prompt.logprobs(
            masks, batch_size=self.batch_size, progress=self.progress, stats=stats
        )

    def result(
        self,
        lm: Any,
        units: Sources,
        prompt: SourcePrompt,
        scores: Tensor | np.ndarray,
        target: str,
        diagnostics: dict[str, Any],
        extra: dict[str, Tensor] | None = None,
        rows: dict[str, list[Any]] | None = None,
    ) -> Attribution:
        """An :class:`Attribution` with ``source`` and ``text`` label columns."""
        params = {**self.params(), "units": units.params()}
        return Attribution(
            torch.as_tensor(np.asarray(scores), dtype=torch.float64),
            units={"source": list(range(prompt.n_sources)), "text": list(prompt.texts)},
            unit_kind="sources",
            method=self.name,
            target=target,
            params=params,
            model_id=lm.name,
            diagnostics=diagnostics,
            rows=rows,
            meta={
                "units_params": units.params(),  # al.evaluate rebuilds the units from these
                "context": prompt.context,
                "spans": [list(s) for s in prompt.spans],
                "prompt": prompt.prompt_text(),
                "response": prompt.response,
                "response_ids": list(prompt.response_ids),
                "response_tokens": lm.to_str_tokens(prompt.response_ids),
            },
            extra=extra,
        )


def _fit(
    surrogate: ContextCiteSurrogate,
    masks: Tensor,
    per_token: Tensor,
    start: int,
    end: int,
    output: str,
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """The surrogate fitted to the response tokens ``[start, end)``:
    ``(weights [n_sources], bias, diagnostics)``."""
    y = reduce_logprobs(per_token[:, start:end], output)  # [n_masks]
    w, b, diag = surrogate.fit(masks.bool(), y.double()[:, None], n_tokens=end - start)
    return w[0], float(b[0]), diag


@register("contextcite", ("sources",))
class ContextCite(ContextMethod):
    """ContextCite: LASSO on random source ablations.

    Args:
        n_ablations: number of random masks (forwards).
        keep_prob: probability of keeping each source in a mask.
        alpha: LASSO regularization (ContextCite's default 0.01).
        output: what the surrogate predicts: ``"logit_prob"`` (the response's
            log-odds, ContextCite's default) or ``"log_prob"``.
        masks: use these ``[n, n_sources]`` masks instead of random ones.
        per_token: also fit one surrogate per response token: scores become
            ``[n_response_tokens, n_sources]`` with a ``token`` row label.
        **common: see :class:`ContextMethod`.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "A is red. B is blue.", " red", units="sources",
        ...                  method="contextcite", n_ablations=8)
        >>> r.scores.shape
        torch.Size([2])
    """

    def __init__(
        self,
        n_ablations: int = ContextCiteSurrogate.samples_default,
        keep_prob: float = ContextCiteSurrogate.keep_prob_default,
        alpha: float = ContextCiteSurrogate.alpha_default,
        output: str = "logit_prob",
        masks: Any = None,
        per_token: bool = False,
        **common: Any,
    ):
        super().__init__(**common)
        check_int("contextcite", "n_ablations", n_ablations, minimum=2 if masks is None else 0)
        if output not in ("logit_prob", "log_prob", "mean_log_prob"):
            raise InputError(f"output must be 'logit_prob' or 'log_prob', got {output!r}")
        self.n_ablations = int(n_ablations)
        self.keep_prob = check_float("contextcite", "keep_prob", keep_prob, maximum=1.0)
        self.alpha = check_float("contextcite", "alpha", alpha, strict=False)
        self.output = output
        self._masks = masks
        self.per_token = bool(per_token)
        # the shared surrogate, ContextCite preset: masks and fit
        self._surrogate = ContextCiteSurrogate(
            samples=max(2, self.n_ablations),
            keep_prob=self.keep_prob,
            alpha=self.alpha,
            seed=self.seed,
            holdout=0.0,  # a held-out refit would double the fitting time; r2 is in sample
        )

    def attribute(
        self, lm: Any, inputs: Any, target: Any, units: Any, counterfactual: Any = None
    ) -> Attribution:
        if counterfactual is not None:
            raise InputError("contextcite ablates sources; it takes no counterfactual")
        t0 = time.perf_counter()
        units, prompt = self.prepare(lm, inputs, target, units)
        if self._masks is not None:
            masks = torch.as_tensor(np.asarray(self._masks)).bool()
            if masks.dim() != 2 or masks.shape[1] != prompt.n_sources:
                raise InputError(f"masks must be [n, {prompt.n_sources}], got {tuple(masks.shape)}")
        else:
            masks = self._surrogate.draw_masks(prompt.n_sources)
        stats: dict[str, int] = {}
        per_token = self._run_logprobs(prompt, masks, stats)  # [n_masks, n_response]
        t1 = time.perf_counter()
        n = per_token.shape[1]
        w, b, fit_diag = _fit(self._surrogate, masks, per_token, 0, n, self.output)
        rows = None
        scores: np.ndarray = w
        if self.per_token:
            scores = np.stack(
                [_fit(self._surrogate, masks, per_token, i, i + 1, self.output)[0]
                 for i in range(n)]
            )  # fmt: skip
            rows = {"token": lm.to_str_tokens(prompt.response_ids)}
        diagnostics = {
            "bias": b,
            **fit_diag,
            "seconds_forward": t1 - t0,
            "seconds_fit": time.perf_counter() - t1,
            **stats,
        }
        return self.result(
            lm,
            units,
            prompt,
            scores,
            f"response_{self.output}({prompt.response!r})",
            diagnostics,
            extra={"masks": masks, "logprobs": per_token},
            rows=rows,
        )


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
        r: a result of ``method="contextcite"`` (also one loaded from disk).
        start, end: response token range ``[start, end)`` (default: all).
        text: instead of a token range, a piece of the response text.
        alpha, output: override the surrogate's settings.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "A is red. B is blue.", " red and blue", units="sources",
        ...                  method="contextcite", n_ablations=8)
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
    output = str(r.params.get("output", "logit_prob")) if output is None else output
    surrogate = ContextCiteSurrogate(alpha=alpha, holdout=0.0)
    w, b, _ = _fit(surrogate, r.extra["masks"].bool(), per_token, start, end, output)
    tokens = r.meta.get("response_tokens", [])
    piece = "".join(tokens[start:end])
    return Attribution(
        torch.as_tensor(w, dtype=torch.float64),
        units=r.units,
        unit_kind=r.unit_kind,
        method=r.method,
        target=f"response_{output}({piece!r})",
        params={**r.params, "alpha": alpha, "output": output},
        model_id=r.model_id,
        diagnostics={"bias": b},
        meta={**r.meta, "span": [start, end], "span_text": piece},
        extra=r.extra,
    )
