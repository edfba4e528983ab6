"""Methods that exist only for ``units="sources"``: a Jensen-Shannon
divergence score, and two *simplified* baselines: a one-pass attention score
and a leave-one-group-out hierarchical search. The published methods they
resemble are :mod:`attrlab.methods.context_traceback` (``attntrace``:
top-K tokens and context subsampling; ``tracllm``: the informed search with
its score ensemble); these two stay as cheap baselines. (Leave-one-out over sources is
``method="occlusion"``, ContextCite ``method="contextcite"``: the estimators
every kind shares, on the sources' ``f``.)

=================  ===========================================  =====================
method             score of source ``i``                        forwards
=================  ===========================================  =====================
``jsd``            sum over response tokens of the JSD between  ``n + 1``
                   next-token distributions with and without i
``attention``      attention from the response positions to     1 (eager attention)
                   all tokens of ``i`` (summed), averaged over
                   layers and heads (simplified; not AttnTrace)
``hierarchical``   leave-one-group-out, refining the top groups  ``~ levels * keep *
                   until single sources (simplified; not         branching``
                   TracLLM: one score, no pruning of the
                   context)
=================  ===========================================  =====================

``f`` is the response's log-probability (``output="log_prob"``; see
:func:`attrlab.units.sources.reduce_logprobs`). The JSD score follows
"Attributing Response to Context: A Jensen-Shannon Divergence Driven
Mechanistic Study of Context Attribution in Retrieval-Augmented Generation".

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("llama"))
    >>> r = al.attribute(lm, "A is red. B is blue. C is green.", " red",
    ...                  units="sources", method="jsd")
    >>> r.scores.shape
    torch.Size([3])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import IndexRangeError, InputError
from ..result import Attribution
from ..units.sources import Sources, SourcesBound
from .base import Method, check_int, register
from .perturbation import _Search

__all__ = ["SourceMethod", "JSDScore", "AttentionScore", "HierarchicalSearch", "loo_masks"]


def loo_masks(n_sources: int) -> Tensor:
    """``[n + 1, n]`` masks: everything kept, then each source removed in turn.

    Example:
        >>> loo_masks(2).int().tolist()
        [[1, 1], [0, 1], [1, 0]]
    """
    return torch.cat(
        [torch.ones(1, n_sources, dtype=torch.bool), ~torch.eye(n_sources, dtype=torch.bool)]
    )


class SourceMethod(Method):
    """Shared options of the methods that exist only for ``units="sources"``.
    The prompt options (``query=``, ``split=``, ``output=`` …) are fields of
    :class:`attrlab.units.Sources` (also accepted by :func:`attrlab.attribute`).

    Args:
        max_new_tokens: length of a generated response (when no target is given).
        batch_size: prompts per forward (``"auto"`` by default; 1 walks the
            prefix tree of the prompts).
        progress: show a progress bar.

    Example:
        >>> issubclass(JSDScore, SourceMethod)
        True
    """

    target_kind = "raw"

    def __init__(
        self,
        max_new_tokens: int = 64,
        batch_size: int | str = "auto",
        progress: bool = False,
    ):
        name = self.name or type(self).__name__
        self.max_new_tokens = check_int(name, "max_new_tokens", max_new_tokens)
        self.batch_size = batch_size
        self.progress = progress

    def prepare(self, lm: Any, inputs: Any, target: Any, units: Any, counterfactual: Any = None,
                output: str | None = None) -> SourcesBound:  # fmt: skip
        """The sources bound to the context and the response (the kind's ``bind``)."""
        if not isinstance(units, Sources):
            raise InputError(f"{self.name} needs units='sources', got {units!r}")
        if counterfactual is not None:
            raise InputError(f"{self.name} removes sources; it takes no counterfactual")
        return units.bind(
            lm, inputs, units.resolve_target(target, lm), None, output, self.batch_size,
            self.max_new_tokens, self.progress,
        )  # fmt: skip


@register("jsd", ("sources",))
class JSDScore(SourceMethod):
    """Sum over response tokens of the Jensen-Shannon divergence (nats) between the
    next-token distributions with the full context and with one source removed.

    Scores are >= 0: JSD measures how much removing a source changes the
    model's predictions, not in which direction.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "A is red. B is blue.", " red", units="sources", method="jsd")
        >>> bool((r.scores >= 0).all())
        True
    """

    def attribute(
        self, lm: Any, inputs: Any, target: Any, units: Any, counterfactual: Any = None
    ) -> Attribution:
        t0 = time.perf_counter()
        bound = self.prepare(lm, inputs, target, units, counterfactual)
        prompt, stats = bound.prompt, bound.stats
        ref = prompt.run(
            loo_masks(prompt.n_sources)[:1],
            lambda logits, rows: logits.double().log_softmax(-1).cpu(),
            self.batch_size,
            stats=stats,
        )[0]  # [n_response, vocab]

        def jsd(logits: Tensor, rows: list[int]) -> Tensor:
            logq = logits.double().log_softmax(-1).cpu()  # [b, n, vocab]
            logp = ref.expand_as(logq)
            logm = torch.logaddexp(logp, logq) - math.log(2.0)
            kl_p = (logp.exp() * (logp - logm)).sum(-1)
            kl_q = (logq.exp() * (logq - logm)).sum(-1)
            return (0.5 * (kl_p + kl_q)).clamp(min=0.0)  # [b, n]

        per_token = torch.stack(
            prompt.run(
                ~torch.eye(prompt.n_sources, dtype=torch.bool),
                jsd,
                self.batch_size,
                progress=self.progress,
                stats=stats,
            )
        )  # [n_sources, n_response]
        bound.target_name = f"response_jsd({prompt.response!r})"
        diag = {"seconds": time.perf_counter() - t0}
        return bound.result(per_token.sum(-1), self, diag, extra={"jsd_per_token": per_token})


@register("attention", ("sources",))
class AttentionScore(SourceMethod):
    """Simplified attention baseline (not AttnTrace, which is ``method="attntrace"``):
    one forward, the attention paid by the response positions to each source's
    tokens (summed over its tokens), averaged over layers, heads and response positions.

    Reads ``blocks.{l}.attn.pattern``, so the model needs eager attention
    (``al.load(..., attn_implementation="eager")``).

    Args:
        layers: which layers to average (default all).
        **common: see :class:`SourceMethod`.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> r = al.attribute(lm, "A is red. B is blue.", " red", units="sources",
        ...                  method="attention")
        >>> bool((r.scores >= 0).all())
        True
    """

    def __init__(self, layers: list[int] | None = None, **common: Any):
        super().__init__(**common)
        self.layers = list(layers) if layers is not None else None

    def attribute(
        self, lm: Any, inputs: Any, target: Any, units: Any, counterfactual: Any = None
    ) -> Attribution:
        t0 = time.perf_counter()
        bound = self.prepare(lm, inputs, target, units, counterfactual)
        prompt = bound.prompt
        ids, ranges = prompt.source_token_ranges()
        n_layers = lm.cfg.n_layers
        layers = list(range(n_layers)) if self.layers is None else list(self.layers)
        for la in layers:
            if not -n_layers <= la < n_layers:
                raise IndexRangeError(f"layer {la} out of range; the model has {n_layers} layers")
        layers = [la % n_layers for la in layers]
        resp = prompt.response_ids
        full = [ids + list(resp)]
        _, cache = lm.run(full, cache=[f"blocks.{la}.attn.pattern" for la in layers])
        p, n = len(ids), len(resp)
        total = torch.zeros(prompt.n_sources, dtype=torch.float64)
        for la in layers:
            pat = cache[f"blocks.{la}.attn.pattern"][0].double()  # [head, q, k]
            q = pat[:, p - 1 : p + n - 1]  # queries predicting the response tokens
            for i, (a, b) in enumerate(ranges):
                total[i] += q[:, :, a:b].sum(-1).mean().item()
        scores = total / len(layers)
        diag = {
            "seconds": time.perf_counter() - t0,
            "n_forwards": 1,
            "token_ranges": [list(r) for r in ranges],
        }
        bound.target_name = f"response_attention({prompt.response!r})"
        return bound.result(scores, self, diag)


def _split(group: list[int], k: int) -> list[list[int]]:
    return [list(g) for g in np.array_split(np.array(group), min(k, len(group))) if len(g)]


@register("hierarchical")
class HierarchicalSearch(_Search):
    """Simplified hierarchical leave-one-group-out search (not TracLLM, which is
    ``method="tracllm"``: halving, a score ensemble, pruned units removed).
    Written against ``f`` only: it runs on every unit kind that provides it,
    with one target row.

    The units are cut into ``branching`` contiguous groups; each group is
    scored by the drop in the target when the whole group is ablated (for
    sources: the response's log-probability with the group removed); the
    ``keep`` best groups are cut again, until single units. Units scored on
    their own get their leave-one-out score; units in pruned groups share
    their group's score evenly (a coarse estimate; ``diagnostics["resolved"]``
    says which is which). Evaluations grow with ``log(n)``, and each holds one
    input, so memory stays bounded.

    Args:
        branching: groups per split.
        keep: groups refined per level.
        **common: ``batch_size``, ``max_new_tokens``, ``progress``,
            ``memory_budget`` (see :class:`~attrlab.methods.perturbation.Occlusion`).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> ctx = " ".join(f"Fact {i} is here." for i in range(12))
        >>> r = al.attribute(lm, ctx, " Fact", units="sources", method="hierarchical")
        >>> len(r), sum(r.diagnostics["resolved"]) >= 3
        (12, True)
    """

    def __init__(self, branching: int = 4, keep: int = 3, **common: Any):
        super().__init__(**common)
        if branching < 2 or keep < 1:
            raise InputError("branching must be >= 2 and keep >= 1")
        self.branching = int(branching)
        self.keep = int(keep)

    def _scores(
        self, value_fn: Callable[[Tensor], Tensor], n: int, v_full: Any, v_empty: Any
    ) -> tuple[Tensor, dict[str, Any]]:
        scores = torch.zeros(n, dtype=torch.float64)
        resolved = [False] * n
        groups = _split(list(range(n)), self.branching)
        full: float | None = None
        levels = 0
        while groups:
            levels += 1
            masks = torch.ones(len(groups), n, dtype=torch.bool)
            for j, g in enumerate(groups):
                masks[j, g] = False
            if full is None:
                masks = torch.cat([torch.ones(1, n, dtype=torch.bool), masks])
            f = value_fn(masks)[:, 0]
            if full is None:
                full, f = float(f[0]), f[1:]
            gscore = full - f
            multi = []
            for j, g in enumerate(groups):
                for i in g:
                    scores[i] = gscore[j] / len(g)
                if len(g) == 1:
                    resolved[g[0]] = True
                else:
                    multi.append(j)
            multi.sort(key=lambda j: -float(gscore[j]))
            groups = [s for j in multi[: self.keep] for s in _split(groups[j], self.branching)]
        diag = {
            "full": full,
            "levels": levels,
            "resolved": resolved,
        }
        return scores[None], diag
