"""Thought Anchors: which sentences of a reasoning trace matter (Bogdan, Macar et al. 2025).

Three methods over ``units="trace"`` (the sentences the model writes after the
prompt, :class:`attrlab.units.Trace`):

* ``method="resampling"`` — counterfactual importance (black box). For
  sentence ``S_i``: ``rollouts`` continuations from just before ``S_i`` whose
  first sentence ``T_i`` is sampled *different from* ``S_i`` (exactly: from the
  model's distribution conditioned on ``T_i != S_i`` as text — the paper keeps
  resamples whose embedding is dissimilar; ``different=False`` keeps every
  resample, the paper's "resampling importance"), and ``rollouts``
  continuations from just after ``S_i`` (``S_i`` kept). Importance is
  ``KL(p(answer | T_i) || p(answer | S_i kept))`` over the two empirical answer
  distributions, with ``smoothing`` pseudo-counts on every answer seen in either.
  Rollouts from one prefix run as one batch continuing a shared key/value cache
  of the trace; each rollout has its own seeded random stream, so the result
  does not depend on ``batch_size``.
* ``method="receiver-heads"`` — attention aggregation (white box). Each head's
  token attention is averaged into a sentence x sentence matrix (mean over the
  token pairs); a sentence's *vertical score* is the mean attention it receives
  from sentences at least ``min_distance`` later. Heads whose vertical scores
  have the highest kurtosis (attention narrowed on few sentences) are the
  receiver heads (``top_k``; or give ``heads=``, e.g. from
  :func:`receiver_heads` over many prompts); the score of a sentence is its mean
  vertical score over them.
* ``method="attention-suppression"`` — the sentence x sentence dependency
  matrix (causal). For each sentence ``i`` every later query position is kept
  from attending to ``i``'s tokens (all heads, all layers, before the
  softmax); ``M[j, i]`` is the KL divergence of the distribution each token of
  sentence ``j`` is predicted from, without vs with the suppression, averaged
  over ``j``'s tokens (rows = receiving sentence, 0 where ``j <= i``).

The answer of a rollout is the last sentence of its trace (``answer=`` a
regular expression takes its last match instead, group 1 if it has one); a
rollout that does not stop within the token budget answers ``"<unfinished>"``.

Example:
    >>> import attrlab as al
    >>> lm = al.zoo.load("reasoning")
    >>> ex = al.zoo.task("reasoning").examples(1)[0]
    >>> r = al.attribute(lm, ex.prompt, units="trace", method="attention-suppression")
    >>> tuple(r.scores.shape) == (len(ex.steps), len(ex.steps))
    True
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..errors import InputError
from ..graph import dependency_graph  # noqa: F401  (re-exported: the method's graph view)
from ..model.attention_masks import check_4d_masks, suppression_mask
from ..units.trace import Trace, TraceView
from .base import Method, check_float, check_int, register

__all__ = [
    "Resampling",
    "ReceiverHeads",
    "AttentionSuppression",
    "answer_kl",
    "conditioned_probs",
    "dependency_graph",
    "receiver_heads",
    "vertical_scores",
]

UNFINISHED = "<unfinished>"


# ------------------------------------------------------------------- helpers
def answer_kl(resampled: Sequence[str], kept: Sequence[str], smoothing: float = 1.0) -> float:
    """``KL(p || q)`` of the answers of ``resampled`` rollouts (``p``) against those
    of ``kept`` rollouts (``q``): empirical frequencies with ``smoothing``
    pseudo-counts added to every answer seen in either list.

    Example:
        >>> round(answer_kl(["1", "1"], ["1", "1"]), 6)
        0.0
        >>> p, q = [3 / 4, 1 / 4], [1 / 4, 3 / 4]   # counts (2, 0) and (0, 2), +1 each
        >>> abs(answer_kl(["1", "1"], ["2", "2"]) - sum(a * math.log(a / b) for a, b in zip(p, q))) < 1e-12
        True
    """
    if not resampled or not kept:
        raise InputError("answer_kl needs at least one answer on each side")
    if smoothing < 0 or not math.isfinite(smoothing):
        raise InputError(f"smoothing must be a finite number >= 0, got {smoothing!r}")
    support = sorted(set(resampled) | set(kept))
    cp, cq = Counter(resampled), Counter(kept)
    k = len(support)
    kl = 0.0
    for a in support:
        p = (cp[a] + smoothing) / (len(resampled) + smoothing * k)
        q = (cq[a] + smoothing) / (len(kept) + smoothing * k)
        if p > 0:
            if q == 0:
                return math.inf
            kl += p * math.log(p / q)
    return max(kl, 0.0)


def conditioned_probs(logp: Tensor, token: int, log_q_here: float, log_q_next: float) -> Tensor:
    """Next-token probabilities ``[vocab]`` on the path of a sentence that must
    not be completed: ``logp`` is the model's log-distribution ``[vocab]``,
    ``token`` the sentence's next token, ``log_q_here`` the log-probability of
    the rest of the sentence from here and ``log_q_next`` after ``token``
    (0 after its last token). Exact: ``p(v | sentence != original)``.

    Example:
        >>> logp = torch.tensor([0.5, 0.3, 0.2]).log()
        >>> [round(abs(x), 6) for x in conditioned_probs(logp, 0, math.log(0.5), 0.0).tolist()]
        [0.0, 0.6, 0.4]
    """
    p = logp.double().exp()
    denom = -math.expm1(log_q_here)  # 1 - Q_t
    if not denom > 0:
        raise InputError(
            "the model gives this sentence probability 1 at this temperature, so no "
            "different sentence can be sampled; raise temperature="
        )
    out = p / denom
    out[token] = p[token] * (-math.expm1(log_q_next)) / denom
    return out.clamp(min=0)


def _answer(text: str, ended: bool, pattern: str | None) -> str:
    if not ended:
        return UNFINISHED
    if pattern is not None:
        found = list(re.finditer(pattern, text))
        if not found:
            return "<none>"
        m = found[-1]
        return m.group(1) if m.groups() else m.group(0)
    from ..units.tokens import Sentences

    spans = Sentences().spans(text)
    return text[spans[-1][0] : spans[-1][1]] if spans else "<none>"


def _first_sentence(text: str) -> str:
    """The first sentence of a rollout's text (the split of ``units="sentences"``)."""
    from ..units.tokens import Sentences

    spans = Sentences().spans(text)
    return text[spans[0][0] : spans[0][1]] if spans else text.strip()


def _view(lm: Any, inputs: Any, units: Any, method: str) -> TraceView:
    if not isinstance(units, Trace):
        raise InputError(f"{method} works on units='trace' (al.units.Trace), got {units!r}")
    return units.prepare(lm, inputs)


def _result(
    lm: Any,
    view: TraceView,
    units: Trace,
    method: Method,
    scores: Tensor,
    target: str,
    diagnostics: dict[str, Any] | None = None,
    extra: dict[str, Tensor] | None = None,
) -> Any:
    """The one place a Thought Anchors result is built (rows = receiving sentence
    for a matrix)."""
    from ..result import Attribution

    labels = view.labels()
    rows = {"sentence": labels["sentence"], "text": labels["text"]} if scores.dim() == 2 else {}
    return Attribution(
        scores.detach().double().cpu(),
        units=labels,
        unit_kind=units.kind,
        method=method.name,
        target=target,
        params=method.params(),
        model_id=str(getattr(lm, "name", "") or ""),
        diagnostics=diagnostics or {},
        rows=rows,
        meta={**view.meta(), "units_params": units.params()},
        extra=extra,
    )


def _seed_of(seed: int, sentence: int, side: int, rollout: int) -> int:
    return (seed * 1_000_003 + sentence * 10_007 + side * 1_009 + rollout) % (2**62)


# ---------------------------------------------------------------- rollouts
class _Sampler:
    """Seeded rollouts continuing prefixes of one prepared trace."""

    def __init__(self, lm: Any, view: TraceView, temperature: float, budget: int, reuse: bool):
        from ..model.masked import prefix_cache

        self.lm, self.view, self.temperature, self.budget = lm, view, temperature, budget
        self.eos = getattr(lm.tokenizer, "eos_token_id", None)
        self.ids = torch.tensor([view.ids], device=lm.device)
        self.kv = prefix_cache(lm, lm.tokenize(self.ids)) if reuse else None
        self.forwards = 0
        self.tokens = 0
        with torch.no_grad():  # log p(token | prefix) of the trace, at the temperature
            logits, _ = lm.hf_forward(self.ids)
        lp = (logits[0].double() / temperature).log_softmax(-1)
        nxt = self.ids[0, 1:]
        self.token_logp = torch.cat(
            [lp[:-1].gather(-1, nxt[:, None])[:, 0].cpu(), torch.zeros(1, dtype=torch.float64)]
        )
        # token_logp[p] = log p(ids[p + 1] | ids[: p + 1])

    def _start(self, n_prefix: int, rows: int) -> tuple[Tensor, Any]:
        """Logits ``[rows, vocab]`` after the prefix and the cache to continue."""
        from ..model.masked import _cropped

        lm = self.lm
        self.forwards += 1
        if self.kv is not None:
            kv = _cropped(self.kv, n_prefix - 1, len(self.view.ids), rows)
            last = self.ids[:, n_prefix - 1 : n_prefix].repeat(rows, 1)
            pos = torch.full((rows, 1), n_prefix - 1, device=lm.device)
            logits, kv = lm.hf_forward(last, position_ids=pos, kv_cache=kv, use_cache=True)
            self.tokens += rows
        else:
            logits, kv = lm.hf_forward(self.ids[:, :n_prefix].repeat(rows, 1), use_cache=True)
            self.tokens += rows * n_prefix
        return logits[:, -1], kv

    def run(
        self,
        n_prefix: int,
        seeds: list[int],
        avoid: tuple[int, int] | None,
        batch_size: int,
    ) -> list[tuple[list[int], bool]]:
        """Rollouts after the first ``n_prefix`` tokens, one per seed; with
        ``avoid=(start, end)`` the first sentence is sampled different from
        ``ids[start:end]``. ``[(tokens, ended)]``."""
        out: list[tuple[list[int], bool]] = []
        for s in range(0, len(seeds), batch_size):
            out += self._batch(n_prefix, seeds[s : s + batch_size], avoid)
        return out

    def _batch(
        self, n_prefix: int, seeds: list[int], avoid: tuple[int, int] | None
    ) -> list[tuple[list[int], bool]]:
        lm, rows = self.lm, len(seeds)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        budget = self.budget - (n_prefix - self.view.n_prompt)
        n_ctx = lm.cfg.n_ctx
        if n_ctx is not None:
            budget = min(budget, n_ctx - n_prefix)
        toks: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        on_path = [avoid is not None] * rows
        sent: list[int] = []
        log_q = torch.zeros(1, dtype=torch.float64)
        if avoid is not None:  # log Q_t: log-probability of the rest of the sentence from t
            a, b = avoid
            lp = self.token_logp[a - 1 : b - 1]  # log p(ids[a + t])
            log_q = torch.cat([lp.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
            sent = self.view.ids[a:b]
        with torch.no_grad():
            logits, kv = self._start(n_prefix, rows)
            for t in range(max(budget, 0)):
                logp = (logits.double() / self.temperature).log_softmax(-1).cpu()  # [rows, vocab]
                probs = logp.exp()
                path = [r for r in range(rows) if on_path[r] and not done[r]]
                if path and t < len(sent):  # every on-path row is at the same token
                    adj = conditioned_probs(
                        logp[path[0]], sent[t], float(log_q[t]), float(log_q[t + 1])
                    )
                    probs[path] = adj[None].expand(len(path), -1)
                u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
                c = probs.cumsum(-1)
                pick = torch.searchsorted(c, (u * c[:, -1])[:, None])[:, 0].clamp(
                    max=c.shape[1] - 1
                )
                nxt = []
                for r in range(rows):
                    v = int(pick[r])
                    if done[r]:
                        nxt.append(self.eos if self.eos is not None else 0)
                        continue
                    if on_path[r] and (t >= len(sent) or v != sent[t]):
                        on_path[r] = False
                    if self.eos is not None and v == self.eos:
                        done[r] = True
                    else:
                        toks[r].append(v)
                    nxt.append(v)
                if all(done) or t + 1 == budget:
                    break
                pos = torch.full((rows, 1), n_prefix + t, device=lm.device)
                inp = torch.tensor(nxt, device=lm.device)[:, None]
                logits, kv = lm.hf_forward(inp, position_ids=pos, kv_cache=kv, use_cache=True)
                logits = logits[:, -1]
                self.forwards += 1
                self.tokens += rows
        return [(toks[r], done[r]) for r in range(rows)]


@register("resampling", ("trace",))
class Resampling(Method):
    """Counterfactual importance of each trace sentence by resampling (see the module docs).

    Args:
        rollouts: rollouts per side (resampled / kept) and sentence.
        temperature: sampling temperature of the rollouts.
        different: sample the replacement sentence conditioned on differing from
            the original (counterfactual importance); False keeps every resample.
        smoothing: pseudo-count per answer in the KL.
        similarity: ``similarity(resampled_sentence, original_sentence) -> float``
            (e.g. the cosine of two sentence embeddings) to filter resamples as
            the paper's code does: the first sentence of each rollout is sampled
            freely, those with ``similarity < threshold`` are the resampled side,
            the others join the kept side; a sentence with no dissimilar
            resample scores 0. Replaces ``different``'s exact conditioning.
        threshold: see ``similarity`` (the paper's code: 0.8 with
            ``all-MiniLM-L6-v2`` embeddings).
        answer: regular expression reading the answer from a rollout's trace
            (default: its last sentence).
        seed: random seed (each rollout has its own stream).
        batch_size: rollouts per forward (default: all of one side at once).
        reuse_prefix: continue the trace's key/value cache (False: recompute the
            prefix for every batch — the one-by-one baseline).
        progress: show a progress bar.

    Example:
        >>> import attrlab as al
        >>> lm = al.zoo.load("reasoning")
        >>> ex = al.zoo.task("reasoning").examples(1)[0]
        >>> r = al.attribute(lm, ex.prompt, units="trace", method="resampling",
        ...                  rollouts=2, progress=False)
        >>> len(r.scores) == len(ex.steps)
        True
    """

    target_kind = "raw"

    def __init__(
        self,
        rollouts: int = 20,
        temperature: float = 1.0,
        different: bool = True,
        smoothing: float = 1.0,
        similarity: Callable[[str, str], float] | None = None,
        threshold: float = 0.8,
        answer: str | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        reuse_prefix: bool = True,
        progress: bool = True,
    ):
        self.rollouts = check_int("resampling", "rollouts", rollouts)
        self.temperature = check_float("resampling", "temperature", temperature)
        self.different = bool(different)
        self.smoothing = check_float("resampling", "smoothing", smoothing, strict=False)
        if similarity is not None and not callable(similarity):
            raise InputError(
                "resampling: similarity must be a function (resampled, original) -> float"
            )
        self.similarity = similarity
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise InputError(f"resampling: threshold must be a number, got {threshold!r}")
        if not math.isfinite(threshold):
            raise InputError(f"resampling: threshold must be finite, got {threshold!r}")
        self.threshold = float(threshold)
        if answer is not None:
            try:
                re.compile(answer)
            except (re.error, TypeError) as e:
                raise InputError(f"resampling: answer must be a regular expression: {e}") from e
        self.answer = answer
        self.seed = check_int("resampling", "seed", seed, minimum=0)
        self.batch_size = check_int("resampling", "batch_size", batch_size, optional=True)
        self.reuse_prefix = bool(reuse_prefix)
        self.progress = bool(progress)

    def params(self) -> dict[str, Any]:
        """JSON-able options (a ``similarity`` function by its name)."""
        p = super().params()
        if self.similarity is not None:
            f = self.similarity
            p["similarity"] = (
                f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', repr(f))}"
            )
        return p

    def attribute(
        self, lm: Any, inputs: Any, target: Any, units: Any, counterfactual: Any = None
    ) -> Any:
        if counterfactual is not None:
            raise InputError("resampling takes no counterfactual; it samples its own")
        view = _view(lm, inputs, units, self.name)
        sampler = _Sampler(lm, view, self.temperature, units.max_new_tokens, self.reuse_prefix)
        bs = self.batch_size or self.rollouts
        tok = lm.tokenizer
        base = _answer(view.trace, view.ended, self.answer)
        exact = self.different and self.similarity is None

        def rollouts(
            n_prefix: int, side: int, i: int, avoid: tuple[int, int] | None
        ) -> list[tuple[str, str]]:
            """``(answer, text after the prefix)`` of each rollout."""
            seeds = [_seed_of(self.seed, i, side, r) for r in range(self.rollouts)]
            head = view.ids[view.n_prompt : n_prefix]
            return [
                (_answer(tok.decode(head + t), ended, self.answer), tok.decode(t))
                for t, ended in sampler.run(n_prefix, seeds, avoid, bs)
            ]

        scores = torch.zeros(view.n, dtype=torch.float64)
        resampled, kept, dissimilar = [], [], []
        bar = tqdm(total=2 * view.n, desc="resampling", disable=not self.progress)
        for i, (a, b) in enumerate(view.spans):
            side0 = rollouts(a, 0, i, (a, b) if exact else None)
            bar.update(1)
            rb = [ans for ans, _ in rollouts(b, 1, i, None)]
            bar.update(1)
            if self.similarity is None:
                ra = [ans for ans, _ in side0]
            else:  # the paper's filter: dissimilar resamples vs kept + similar ones
                ra = []
                for ans, text in side0:
                    sim = float(self.similarity(_first_sentence(text), view.texts[i]))
                    if not math.isfinite(sim):
                        from ..errors import NonFiniteError

                        raise NonFiniteError(f"resampling: similarity returned {sim}")
                    (ra if sim < self.threshold else rb).append(ans)
                dissimilar.append(len(ra))
            scores[i] = answer_kl(ra, rb, self.smoothing) if ra else 0.0
            resampled.append(dict(Counter(ra)))
            kept.append(dict(Counter(rb)))
        bar.close()
        if not bool(torch.isfinite(scores).all()):
            from ..errors import NonFiniteError

            raise NonFiniteError("resampling: a KL is infinite; use smoothing > 0")
        diag = {
            "answer": base,
            "resampled_answers": resampled,
            "kept_answers": kept,
            "forwards": sampler.forwards,
            "tokens": sampler.tokens,
            "rollouts_total": 2 * view.n * self.rollouts,
            **({"dissimilar": dissimilar} if self.similarity is not None else {}),
        }
        return _result(lm, view, units, self, scores, f"answer distribution ({base!r})", diag)


# ------------------------------------------------------- attention aggregation
def _patterns(lm: Any, view: TraceView) -> Tensor:
    """Attention weights ``[layer, head, q, k]`` on the prepared trace."""
    sites = [f"blocks.{layer}.attn.pattern" for layer in range(lm.cfg.n_layers)]
    with torch.no_grad():
        _, cache = lm.run(torch.tensor([view.ids]), cache=sites)
    return torch.stack([cache[s][0].float().cpu() for s in sites])


def vertical_scores(
    pattern: Tensor, spans: Sequence[tuple[int, int]], min_distance: int = 1
) -> Tensor:
    """Vertical attention scores ``[..., n]`` from attention weights
    ``[..., q, k]``: the token attention averaged into a sentence x sentence
    matrix (mean over token pairs), then for each sentence ``i`` the mean of its
    column over the sentences ``j >= i + min_distance``; NaN where there is none.

    Example:
        >>> a = torch.zeros(4, 4); a[2:, 0] = 1.0          # tokens 2, 3 look at token 0
        >>> vertical_scores(a, [(0, 2), (2, 4)]).tolist()  # sentence 0 = tokens 0-1
        [0.5, nan]
    """
    n = len(spans)
    sent = torch.stack(
        [
            torch.stack([pattern[..., qa:qb, ka:kb].mean((-2, -1)) for ka, kb in spans], -1)
            for qa, qb in spans
        ],
        -2,
    )  # [..., n (receiving j), n (attended i)]
    out = torch.full((*pattern.shape[:-2], n), math.nan)
    for i in range(n):
        later = list(range(i + min_distance, n))
        if later:
            out[..., i] = sent[..., later, i].mean(-1)
    return out


def _kurtosis(x: Tensor) -> Tensor:
    """Excess (Fisher) kurtosis over the last axis, ignoring NaN (biased, as
    ``scipy.stats.kurtosis`` by default); NaN when there are fewer than 2 values
    or no spread."""
    ok = torch.isfinite(x)
    cnt = ok.sum(-1).clamp(min=1)
    z = torch.where(ok, x, torch.zeros_like(x))
    mean = z.sum(-1, keepdim=True) / cnt[..., None]
    d = torch.where(ok, x - mean, torch.zeros_like(x))
    m2 = (d**2).sum(-1) / cnt
    m4 = (d**4).sum(-1) / cnt
    k = m4 / m2**2 - 3.0
    return torch.where((ok.sum(-1) >= 2) & (m2 > 0), k, torch.full_like(k, math.nan))


#: the paper's code: 20 receiver heads, vertical scores from sentences >= 4 later
RECEIVER_TOP_K = 20
RECEIVER_MIN_DISTANCE = 4


def receiver_heads(
    lm: Any,
    prompts: Sequence[str],
    units: Trace | None = None,
    top_k: int = RECEIVER_TOP_K,
    min_distance: int = RECEIVER_MIN_DISTANCE,
) -> list[tuple[int, int]]:
    """The ``top_k`` heads ``(layer, head)`` (all heads if the model has fewer)
    whose vertical scores have the highest kurtosis averaged over the traces of
    ``prompts`` (the paper's receiver heads; its code's defaults: 20 heads,
    sentences at least 4 apart).

    Example:
        >>> import attrlab as al
        >>> t = al.zoo.task("reasoning")
        >>> lm = al.zoo.load("reasoning")
        >>> heads = receiver_heads(lm, [e.prompt for e in t.examples(2)], top_k=3)
        >>> len(heads)
        3
    """
    units = units or Trace()
    ks = []
    for p in prompts:
        view = units.prepare(lm, p)
        ks.append(_kurtosis(vertical_scores(_patterns(lm, view), view.spans, min_distance)))
    k = torch.nanmean(torch.stack(ks), 0)  # [layer, head]
    k = torch.nan_to_num(k, nan=-math.inf)
    order = k.flatten().argsort(descending=True)[:top_k].tolist()
    H = k.shape[1]
    return [(o // H, o % H) for o in order]


@register("receiver-heads", ("trace",))
class ReceiverHeads(Method):
    """Sentence scores from receiver heads' attention (see the module docs).

    Args:
        top_k: receiver heads used (chosen on this trace by kurtosis); None: the
            paper's 20, or every head of a smaller model.
        heads: ``[(layer, head), ...]`` to use instead (e.g. :func:`receiver_heads`
            over many prompts, as the paper chooses them).
        min_distance: a sentence's vertical score counts the sentences at least
            this many later (the paper's 4; sentences with none score 0).

    Example:
        >>> import attrlab as al
        >>> ex = al.zoo.task("reasoning").examples(1)[0]
        >>> r = al.attribute(al.zoo.load("reasoning"), ex.prompt, units="trace",
        ...                  method="receiver-heads", top_k=3)
        >>> len(r.diagnostics["receiver_heads"])
        3
    """

    target_kind = "raw"

    def __init__(
        self,
        top_k: int | None = None,
        heads: Sequence[Sequence[int]] | None = None,
        min_distance: int = RECEIVER_MIN_DISTANCE,
    ):
        self.top_k = check_int("receiver-heads", "top_k", top_k, optional=True)
        self.heads = None if heads is None else [[int(a), int(b)] for a, b in heads]
        self.min_distance = check_int("receiver-heads", "min_distance", min_distance)

    def attribute(
        self, lm: Any, inputs: Any, target: Any, units: Any, counterfactual: Any = None
    ) -> Any:
        if counterfactual is not None:
            raise InputError("receiver-heads takes no counterfactual")
        L, H = lm.cfg.n_layers, lm.cfg.n_heads
        if self.heads is not None:
            bad = [h for h in self.heads if not (0 <= h[0] < L and 0 <= h[1] < H)]
            if bad:
                from ..errors import IndexRangeError

                raise IndexRangeError(
                    f"receiver-heads: heads {bad} out of range ({L} layers x {H} heads)"
                )
        elif self.top_k is not None and self.top_k > L * H:
            raise InputError(f"receiver-heads: top_k={self.top_k} but the model has {L * H} heads")
        top_k = self.top_k if self.top_k is not None else min(RECEIVER_TOP_K, L * H)
        view = _view(lm, inputs, units, self.name)
        vert = vertical_scores(_patterns(lm, view), view.spans, self.min_distance)  # [L, H, n]
        kurt = _kurtosis(vert)  # [L, H]
        if self.heads is not None:
            chosen = [tuple(h) for h in self.heads]
        else:
            order = torch.nan_to_num(kurt, nan=-math.inf).flatten().argsort(descending=True)
            chosen = [(o // H, o % H) for o in order[:top_k].tolist()]
        sel = torch.stack([vert[a, b] for a, b in chosen])  # [k, n]
        no_later = [i for i in range(view.n) if not bool(torch.isfinite(sel[:, i]).all())]
        scores = torch.nan_to_num(sel, nan=0.0).mean(0)
        diag = {
            "receiver_heads": [list(h) for h in chosen],
            "kurtosis": [[None if math.isnan(v) else v for v in row] for row in kurt.tolist()],
            "no_later_sentence": no_later,
        }
        extra = {"vertical_scores": torch.nan_to_num(vert, nan=0.0)}
        return _result(lm, view, units, self, scores, "attention received", diag, extra)


# ------------------------------------------------------- attention suppression
@register("attention-suppression", ("trace",))
class AttentionSuppression(Method):
    """The sentence x sentence dependency matrix by attention suppression (see the module docs).

    Args:
        batch_size: suppressed copies per forward (default: every sentence at once).
        temperature: the distributions compared are the model's at this
            temperature (the paper's code: 0.6). The defaults are the variant
            that recovers the zoo task's dependency graph best (AUROC 0.914
            vs 0.755 for the paper's ``temperature=0.6, log_kl=True,
            positions="at"``; ``docs/reasoning.md``).
        log_kl: average ``log(KL + 1e-9) - log(1e-9)`` over the sentence's tokens
            (the paper's code averages ``log(KL + 1e-9)``: the same up to a
            constant, which keeps "no effect" at 0); False: the KL itself.
        positions: ``"tokens"``: the distributions of ``S_j``'s tokens (the outputs
            just before them); ``"at"``: the outputs at ``S_j``'s positions (the
            paper's code; the last one predicts the next sentence's first token).

    Example:
        >>> import attrlab as al
        >>> ex = al.zoo.task("reasoning").examples(1)[0]
        >>> r = al.attribute(al.zoo.load("reasoning"), ex.prompt, units="trace",
        ...                  method="attention-suppression")
        >>> bool((r.scores.triu() == 0).all())    # only later sentences can depend
        True
    """

    target_kind = "raw"

    def __init__(
        self,
        batch_size: int | None = None,
        temperature: float = 1.0,
        log_kl: bool = False,
        positions: str = "tokens",
    ):
        self.batch_size = check_int(
            "attention-suppression", "batch_size", batch_size, optional=True
        )
        self.temperature = check_float("attention-suppression", "temperature", temperature)
        self.log_kl = bool(log_kl)
        if positions not in SUPPRESSION_POSITIONS:
            raise InputError(
                f"attention-suppression: positions must be one of {SUPPRESSION_POSITIONS}, "
                f"got {positions!r}"
            )
        self.positions = positions

    def attribute(
        self, lm: Any, inputs: Any, target: Any, units: Any, counterfactual: Any = None
    ) -> Any:
        if counterfactual is not None:
            raise InputError("attention-suppression takes no counterfactual")
        view = _view(lm, inputs, units, self.name)
        matrix = suppression_matrix(
            lm, view, self.batch_size, self.temperature, self.log_kl, self.positions
        )
        return _result(
            lm,
            view,
            units,
            self,
            matrix,
            "next-token distributions",
            {"forwards": 1 + math.ceil(view.n / (self.batch_size or view.n))},
        )


#: which outputs stand for sentence ``j`` in :func:`suppression_matrix`
SUPPRESSION_POSITIONS = ("tokens", "at")
#: added to a KL before its log (the paper's code)
LOG_KL_EPS = 1e-9


def suppression_matrix(
    lm: Any,
    view: TraceView,
    batch_size: int | None = None,
    temperature: float = 1.0,
    log_kl: bool = False,
    positions: str = "tokens",
) -> Tensor:
    """``M [n, n]`` (rows = receiving sentence j, columns = suppressed sentence i):
    the mean over the tokens ``t`` of sentence ``j`` of
    ``log(KL(p(t | prefix, original) || p(t | prefix, i suppressed)) + 1e-9)``
    minus ``log(1e-9)`` (the paper's log-KL shifted by a constant so that no
    effect scores 0; ``log_kl=False``: of the KL itself), the next-token distributions at
    ``temperature``, taken just before each of ``j``'s tokens (``positions="tokens"``)
    or at each of its positions (``"at"``). 0 where ``j <= i``.

    Example:
        >>> import attrlab as al
        >>> lm = al.zoo.load("reasoning")
        >>> view = al.units.Trace().prepare(lm, al.zoo.task("reasoning").examples(1)[0].prompt)
        >>> suppression_matrix(lm, view).shape[0] == view.n
        True
    """
    ids = torch.tensor([view.ids], device=lm.device)
    T, n = ids.shape[1], view.n
    with torch.no_grad():
        base, _ = lm.hf_forward(ids)
        base_lp = (base[0].double() / temperature).log_softmax(-1)  # [T, vocab]
        check_4d_masks(
            lm, ids, base[0], "attention-suppression", "Use resampling or receiver-heads"
        )
        out = torch.zeros(n, n, dtype=torch.float64)
        bs = batch_size or n
        for s in range(0, n, bs):
            rows = list(range(s, min(n, s + bs)))
            masks = torch.stack([suppression_mask(T, view.spans[i], lm.dtype) for i in rows])[
                :, None
            ]
            logits, _ = lm.hf_forward(ids.repeat(len(rows), 1), attention_mask=masks.to(lm.device))
            lp = (logits.double() / temperature).log_softmax(-1)  # [rows, T, vocab]
            kl = (
                (base_lp.exp()[None] * (base_lp[None] - lp)).sum(-1).clamp(min=0).cpu()
            )  # [rows, T]
            if log_kl:  # log(KL + eps) - log(eps): the paper's log-KL, 0 where KL = 0
                kl = (kl / LOG_KL_EPS).log1p()
            shift = 1 if positions == "tokens" else 0
            for r, i in enumerate(rows):
                for j in range(i + 1, n):
                    a, b = view.spans[j]
                    out[j, i] = kl[r, a - shift : b - shift].mean()
    return out


# ------------------------------------------------------------------ the graph
# dependency_graph (a view of a result: no computation) lives in attrlab.graph
