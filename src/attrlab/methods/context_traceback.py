"""Context traceback for long contexts: AttnTrace and TracLLM as their papers
define them (``units="sources"`` only).

``attntrace`` ("AttnTrace: Attention-based Context Traceback for Long-Context
LLMs", Wang et al. 2025). For a prompt, the attention weight of every context
token is averaged over all layers, all heads and all response tokens (the
queries are the positions that predict the response tokens); a source's score
is the mean of its ``top_k`` largest token weights. *Context subsampling*:
this is done on ``subsamples`` prompts that each keep a random
``floor(ratio * n)`` of the sources (in context order), and a source's score is
its mean over the subsamples that kept it (0 if none did). Seeded. The
attention rows of the response queries are read in one forward after a
chunked prefill of the prompt (KV cache), so memory grows linearly with the
context, never with its square. Defaults are the paper's: ``top_k=5``,
``ratio=0.4``, ``subsamples=30``.

``tracllm`` ("TracLLM: A Generic Framework for Attributing Long Context LLMs",
Wang et al., USENIX Security 2025). The informed search: the sources start as
one group; every level halves each group of more than one source; when more
than ``top_k`` groups result they are scored *within the context of the
current groups only* (pruned sources are gone) and the ``top_k`` best are
kept; until single sources. The search runs once per score function:

====================  =====================================================
``"stc"``             ``v({g}) - v({})``: the group alone vs no context
``"loo"``             ``v(all) - v(all without g)``
``"shapley"``         mean marginal contribution over ``permutations``
                      random orders of the groups
``"denoised_shapley"`` mean of the top ``beta`` share (at least one) of
                      the group's marginal contributions
====================  =====================================================

``v`` is the response's log-probability (:mod:`attrlab.units.sources`,
``output="log_prob"``). The ensemble: a source's score is the maximum over the
score functions whose search kept it of that function's final score (LOO's
times ``loo_weight``); sources no search kept score 0 and are listed in
``diagnostics["selected"]`` as False. Defaults are the paper's:
``top_k=5``, ``score_funcs=("stc", "loo", "denoised_shapley")``,
``permutations=20``, ``beta=0.2``, ``loo_weight=2``. One deviation: when the
last split leaves at most ``top_k`` single sources the reference code returns
the previous level's group scores; here the final single sources are scored.

Cost is reported as ``diagnostics["n_prompts"]`` (distinct ablated prompts run,
the papers' "forwards") and ``n_forwards`` (model calls after batching).

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("llama"))
    >>> ctx = " ".join(f"Fact {i} is here." for i in range(8))
    >>> r = al.attribute(lm, ctx, " Fact", units="sources", method="tracllm", top_k=2,
    ...                  permutations=2)
    >>> len(r), sum(r.diagnostics["selected"]) <= 2 * 3
    (8, True)
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import IndexRangeError, InputError, NonFiniteError
from ..model.lock import model_lock
from ..model.long_context import announce, attention_prefill_chunk, long_context_estimate
from ..model.wrapper import Batch
from ..result import Attribution
from .base import register
from .context_baselines import SourceMethod
from .perturbation import _Search

__all__ = [
    "AttnTrace",
    "TracLLM",
    "topk_mean",
    "subsample_masks",
    "tracllm_search",
    "tracllm_ensemble",
    "SCORE_FUNCS",
]

SCORE_FUNCS = ("stc", "loo", "shapley", "denoised_shapley")


# ---------------------------------------------------------------- AttnTrace
def topk_mean(token_scores: Tensor, ranges: Sequence[tuple[int, int] | None], k: int) -> Tensor:
    """Per source, the mean of the ``k`` largest entries of ``token_scores [T]``
    in its token range (all of them when it has fewer; 0 for an empty or None range).

    Example:
        >>> import torch
        >>> a = torch.tensor([0.1, 0.5, 0.2, 0.3, 0.3, 0.0, 0.9], dtype=torch.float64)
        >>> topk_mean(a, [(0, 3), (3, 7)], 2).tolist()
        [0.35, 0.6]
    """
    out = torch.zeros(len(ranges), dtype=torch.float64)
    for i, r in enumerate(ranges):
        if r is None or r[1] <= r[0]:
            continue
        v = token_scores[r[0] : r[1]].double()
        out[i] = v.topk(min(k, v.numel())).values.mean()
    return out


def subsample_masks(n: int, ratio: float, subsamples: int, seed: int) -> Tensor:
    """``[subsamples, n]`` keep-masks, each keeping ``max(1, floor(ratio * n))``
    sources drawn uniformly without replacement (seeded).

    Example:
        >>> m = subsample_masks(10, 0.4, 3, seed=0)
        >>> m.shape, m.sum(1).tolist()
        (torch.Size([3, 10]), [4, 4, 4])
    """
    keep = max(1, int(math.floor(ratio * n + 1e-9)))
    g = torch.Generator().manual_seed(int(seed))
    masks = torch.zeros(subsamples, n, dtype=torch.bool)
    for b in range(subsamples):
        masks[b, torch.randperm(n, generator=g)[:keep]] = True
    return masks


def _response_attention(
    lm: Any, ids: list[int], n_resp: int, layers: list[int], chunk: int
) -> Tensor:
    """Attention weight of every key position, averaged over ``layers``, heads and
    the ``n_resp`` queries that predict the last ``n_resp`` tokens of ``ids``:
    ``[len(ids) - 1]``. The prompt is prefilled in ``chunk``-token pieces (KV
    cache); only the query rows are read, so memory is linear in the length."""
    from transformers import DynamicCache

    p = len(ids) - n_resp  # prompt tokens
    q0 = p - 1  # the first query: it predicts the first response token
    cache = DynamicCache()
    with model_lock(lm.model), torch.no_grad():
        for s in range(0, q0, chunk):
            piece = ids[s : min(q0, s + chunk)]
            lm.hf_forward(
                torch.tensor([piece], device=lm.device),
                position_ids=torch.arange(s, s + len(piece), device=lm.device)[None],
                kv_cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        queries = ids[q0 : q0 + n_resp]
        batch = Batch(
            torch.tensor([queries]),
            torch.ones(1, q0 + n_resp, dtype=torch.long),
            torch.arange(q0, q0 + n_resp)[None],
        )
        sites = [f"blocks.{la}.attn.pattern" for la in layers]
        _, got = lm.run(batch, cache=sites, kv_cache=cache if q0 > 0 else None)
    total = torch.zeros(q0 + n_resp, dtype=torch.float64)
    for site in sites:
        pat = got[site][0].double()  # [head, n_resp, q0 + n_resp]
        total += pat.mean((0, 1)).cpu()
    return total / len(sites)


@register("attntrace", ("sources",))
class AttnTrace(SourceMethod):
    """AttnTrace: top-K token attention per source with context subsampling
    (see :mod:`attrlab.methods.context_traceback`). Needs eager attention
    (``al.load(..., attn_implementation="eager")``, the default).

    Args:
        top_k: tokens averaged per source (the paper's K).
        ratio: share of the sources each subsample keeps (the paper's rho).
        subsamples: subsampled prompts (the paper's B); ``ratio=1, subsamples=1``
            is plain top-K attention on the full context.
        seed: the subsamples' seed.
        layers: layers averaged (default all).
        memory_budget: bytes (or "2GB") the prefill may use; sets its chunk.
        **common: see :class:`~attrlab.methods.context_baselines.SourceMethod`.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> r = al.attribute(lm, "A is red. B is blue. C is green.", " red",
        ...                  units="sources", method="attntrace", subsamples=4)
        >>> r.scores.shape, r.diagnostics["n_forwards"] <= 4
        (torch.Size([3]), True)
    """

    def __init__(
        self,
        top_k: int = 5,
        ratio: float = 0.4,
        subsamples: int = 30,
        seed: int = 0,
        layers: list[int] | None = None,
        memory_budget: int | str | None = None,
        **common: Any,
    ):
        super().__init__(**common)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be a positive int, got {top_k!r}")
        if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise InputError(f"ratio must be in (0, 1], got {ratio!r}")
        if isinstance(subsamples, bool) or not isinstance(subsamples, int) or subsamples < 1:
            raise InputError(f"subsamples must be a positive int, got {subsamples!r}")
        self.top_k = top_k
        self.ratio = float(ratio)
        self.subsamples = subsamples
        self.seed = int(seed)
        self.layers = list(layers) if layers is not None else None
        self.memory_budget = memory_budget

    def attribute(
        self, lm: Any, inputs: Any, target: Any, units: Any, counterfactual: Any = None
    ) -> Attribution:
        t0 = time.perf_counter()
        bound = self.prepare(lm, inputs, target, units, counterfactual)
        prompt = bound.prompt
        n = prompt.n_sources
        n_layers = lm.cfg.n_layers
        layers = list(range(n_layers)) if self.layers is None else list(self.layers)
        for la in layers:
            if not -n_layers <= la < n_layers:
                raise IndexRangeError(f"layer {la} out of range; the model has {n_layers} layers")
        layers = sorted({la % n_layers for la in layers})
        if self.ratio >= 1.0:
            masks = torch.ones(1, n, dtype=torch.bool)
            counts = Counter({masks[0].numpy().tobytes(): self.subsamples})
        else:
            masks = subsample_masks(n, self.ratio, self.subsamples, self.seed)
            counts = Counter(row.numpy().tobytes() for row in masks)
        resp = list(prompt.response_ids)
        # one forward per distinct subsample (identical subsamples give identical scores)
        distinct = [torch.from_numpy(np.frombuffer(k, dtype=bool).copy()) for k in counts]
        n_full = len(prompt.token_ranges(None)[0]) + len(resp)
        chunk = attention_prefill_chunk(lm, n_full, self.memory_budget)
        if n_full > 4096 or self.progress:
            announce(lm, f"attntrace over {n_full} tokens ({len(distinct)} forwards, chunk "
                     f"{chunk})", long_context_estimate(lm, n_full, len(resp), chunk),
                     self.progress)  # fmt: skip
        total = torch.zeros(n, dtype=torch.float64)
        seen = torch.zeros(n, dtype=torch.float64)
        for m in tqdm(distinct, desc="attntrace", disable=not self.progress):
            ids, ranges = prompt.token_ranges(m)
            att = _response_attention(lm, ids + resp, len(resp), layers, chunk)
            if not torch.isfinite(att).all():
                raise NonFiniteError("non-finite attention weights; check the model's dtype")
            s = topk_mean(att, ranges, self.top_k)
            w = counts[m.numpy().tobytes()]
            total += w * s * m.double()
            seen += w * m.double()
        scores = torch.where(seen > 0, total / seen.clamp(min=1), torch.zeros_like(total))
        diag = {
            "seconds": time.perf_counter() - t0,
            "n_forwards": len(distinct),
            "n_prompts": len(distinct),
            "times_kept": seen.long().tolist(),
            "prefill_chunk": chunk,
        }
        bound.target_name = f"response_attention({prompt.response!r})"
        # not "masks": the sources kind would run those prompts again for their log-probs
        return bound.result(scores, self, diag, extra={"subsample_masks": masks})


# ---------------------------------------------------------------- TracLLM
def _halve(group: list[int]) -> list[list[int]]:
    mid = len(group) // 2
    return [group[:mid], group[mid:]]


def _group_scores(
    f: Callable[[Tensor], Tensor],
    n: int,
    groups: list[list[int]],
    func: str,
    permutations: int,
    beta: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """One score per group, in the context of ``groups`` only (``f``: keep-masks
    ``[m, n]`` -> values ``[m]``)."""
    m = len(groups)
    member = torch.zeros(m, n, dtype=torch.bool)
    for j, g in enumerate(groups):
        member[j, g] = True
    base = member.any(0)
    empty = torch.zeros(1, n, dtype=torch.bool)
    if func == "stc":
        v = f(torch.cat([empty, member]))
        return (v[1:] - v[0]).numpy()
    if func == "loo":
        v = f(torch.cat([base[None], base[None] & ~member]))
        return (v[0] - v[1:]).numpy()
    # Shapley sampling: for each permutation the growing coalitions of groups
    orders = [rng.permutation(m) for _ in range(permutations)]
    rows = [empty[0]]
    for order in orders:
        cur = torch.zeros(n, dtype=torch.bool)
        for j in order:
            cur = cur | member[j]
            rows.append(cur)
    v = f(torch.stack(rows))
    marg: list[list[float]] = [[] for _ in range(m)]
    r = 1
    for order in orders:
        prev = float(v[0])
        for j in order:
            marg[j].append(float(v[r]) - prev)
            prev = float(v[r])
            r += 1
    if func == "shapley":
        return np.array([np.mean(x) for x in marg])
    top = max(1, int(permutations * beta))
    return np.array([np.mean(sorted(x, reverse=True)[:top]) for x in marg])


def tracllm_search(
    f: Callable[[Tensor], Tensor],
    n: int,
    top_k: int = 5,
    func: str = "denoised_shapley",
    permutations: int = 20,
    beta: float = 0.2,
    seed: int = 0,
) -> tuple[list[int], np.ndarray, int]:
    """TracLLM's informed search with one score function over ``n`` sources;
    ``f``: keep-masks ``[m, n]`` -> the response's value ``[m]``.

    Returns the kept sources (context order), their final scores, and the levels run.

    Example:
        >>> import torch
        >>> w = torch.zeros(8, dtype=torch.float64); w[5] = 3.0; w[1] = 1.0
        >>> f = lambda keep: keep.double() @ w
        >>> kept, scores, levels = tracllm_search(f, 8, top_k=1, func="loo")
        >>> kept, scores.tolist()
        ([5], [3.0])
    """
    if func not in SCORE_FUNCS:
        raise InputError(f"score function must be one of {SCORE_FUNCS}, got {func!r}")
    rng = np.random.default_rng(seed)
    nodes: list[list[int]] = [list(range(n))]
    scores = np.zeros(1)
    levels = 0
    while any(len(g) > 1 for g in nodes):
        levels += 1
        new = [h for g in nodes for h in (_halve(g) if len(g) > 1 else [g])]
        final = all(len(g) == 1 for g in new)
        if len(new) <= top_k and not final:
            nodes = new
            continue
        s = _group_scores(f, n, new, func, permutations, beta, rng)
        if not np.isfinite(s).all():
            raise NonFiniteError(f"non-finite {func} scores in TracLLM's search")
        best = sorted(np.argsort(-s, kind="stable")[:top_k].tolist())
        nodes, scores = [new[j] for j in best], s[best]
    if levels == 0:  # a single source
        s = _group_scores(f, n, nodes, func, permutations, beta, rng)
        scores = s
    return [g[0] for g in nodes], np.asarray(scores, dtype=np.float64), levels


def tracllm_ensemble(
    f: Callable[[Tensor], Tensor],
    n: int,
    top_k: int = 5,
    score_funcs: Sequence[str] = ("stc", "loo", "denoised_shapley"),
    permutations: int = 20,
    beta: float = 0.2,
    loo_weight: float = 2.0,
    seed: int = 0,
) -> tuple[np.ndarray, list[bool], dict[str, list[float | None]], dict[str, int]]:
    """TracLLM's ensemble: :func:`tracllm_search` once per score function; a
    source's score is the maximum over the searches that kept it of its final
    score (LOO's times ``loo_weight``), 0 for sources no search kept.

    Returns ``(scores [n], selected [n], per-function final scores (None where
    not kept), levels per function)``.

    Example:
        >>> import torch
        >>> w = torch.zeros(8, dtype=torch.float64); w[5] = 3.0
        >>> s, sel, _, _ = tracllm_ensemble(lambda k: k.double() @ w, 8, top_k=1)
        >>> s.tolist()[5], sum(sel)
        (6.0, 1)
    """
    best = np.full(n, -np.inf)
    per_func: dict[str, list[float | None]] = {}
    levels: dict[str, int] = {}
    for k, func in enumerate(score_funcs):
        kept, s, lv = tracllm_search(f, n, top_k, func, permutations, beta, seed + k)
        levels[func] = lv
        weight = loo_weight if func == "loo" else 1.0
        row: list[float | None] = [None] * n
        for i, v in zip(kept, s):
            row[i] = float(v)
            best[i] = max(best[i], weight * float(v))
        per_func[func] = row
    selected = np.isfinite(best)
    return np.where(selected, best, 0.0), selected.tolist(), per_func, levels


@register("tracllm")
class TracLLM(_Search):
    """TracLLM: the informed search with an ensemble of score functions (see
    :mod:`attrlab.methods.context_traceback`). Written against ``f`` only, so it
    runs on every unit kind that provides it (sources, reasoning steps, heads,
    tokens …), with one target row.

    Args:
        top_k: groups kept per level and sources reported (the paper's K).
        score_funcs: the ensemble, a subset of :data:`SCORE_FUNCS`.
        permutations: Shapley sampling permutations (the paper's sh_N).
        beta: share of the marginal contributions denoised Shapley averages.
        loo_weight: LOO's weight in the ensemble (the paper's w).
        seed: the permutations' seed.
        **common: ``batch_size``, ``max_new_tokens``, ``progress``,
            ``memory_budget`` (see :class:`~attrlab.methods.perturbation.Occlusion`).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> ctx = " ".join(f"Fact {i} is here." for i in range(6))
        >>> r = al.attribute(lm, ctx, " Fact", units="sources", method="tracllm",
        ...                  top_k=2, score_funcs=("loo",))
        >>> sum(r.diagnostics["selected"])
        2
    """

    def __init__(
        self,
        top_k: int = 5,
        score_funcs: Sequence[str] = ("stc", "loo", "denoised_shapley"),
        permutations: int = 20,
        beta: float = 0.2,
        loo_weight: float = 2.0,
        seed: int = 0,
        **common: Any,
    ):
        super().__init__(**common)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be a positive int, got {top_k!r}")
        funcs = [score_funcs] if isinstance(score_funcs, str) else list(score_funcs)
        if not funcs or any(fn not in SCORE_FUNCS for fn in funcs):
            raise InputError(f"score_funcs must be a non-empty subset of {SCORE_FUNCS}")
        if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
            raise InputError(f"permutations must be a positive int, got {permutations!r}")
        if not 0.0 < float(beta) <= 1.0:
            raise InputError(f"beta must be in (0, 1], got {beta!r}")
        self.top_k = top_k
        self.score_funcs = tuple(funcs)
        self.permutations = permutations
        self.beta = float(beta)
        self.loo_weight = float(loo_weight)
        self.seed = int(seed)

    def _scores(
        self, value_fn: Callable[[Tensor], Tensor], n: int, v_full: Any, v_empty: Any
    ) -> tuple[Tensor, dict[str, Any]]:
        scores_np, selected, per_func, levels = tracllm_ensemble(
            lambda keep: value_fn(keep)[:, 0], n, self.top_k, self.score_funcs,
            self.permutations, self.beta, self.loo_weight, self.seed,
        )  # fmt: skip
        diag = {
            "selected": selected,
            "levels": levels,
            "scores_by_func": per_func,
        }
        return torch.from_numpy(scores_np)[None], diag
