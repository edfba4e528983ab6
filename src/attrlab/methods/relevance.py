"""Relevance propagation: the gradient estimators run with LRP rules.

Both methods are the gate-gradient estimators of :mod:`attrlab.methods.gradient`
run inside :func:`attrlab.lrp.propagation`, so every gradient through the model
follows the rules of a :class:`attrlab.lrp.Composite` (AttnLRP by default):

- ``attnlrp`` (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance
  Propagation for Transformers"): input x gradient over token gates with the
  zero ablation, i.e. ``x . grad`` at the token embeddings; words, sentences,
  spans and the sources of a prompt (``units="sources"``) sum their tokens. One forward and one backward per target row (a
  continuation's rows share the forward). The diagnostics account for every
  bit of the target: ``value = relevance_sum + bias_share + position_share +
  softmax_share + output_share + conservation_error``, where ``output_share`` is
  what the target adds beyond the logits (a log-prob's normaliser) and
  ``conservation_error`` is float round-off.
- ``relp`` (Jafari et al., "RelP: Faithful and Efficient Circuit Discovery via
  Relevance Patching"): attribution patching with the LRP propagation
  coefficients in place of the gradient, ``(a - a_ablated) . grad_LRP``, on
  every component kind (heads, per position, q/k/v, attn, mlp, neurons, resid,
  layers) and on edges (RelP's EAP). Same ablations, sign and
  ``direction=`` as ``atp``; the cost is AtP's plus a few cheap autograd nodes.
  Its default rules are the RelP paper's (``"cp-lrp"``: no relevance through
  the attention weights); ``rules="attnlrp"`` propagates through them.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("llama"))
    >>> r = al.attribute(lm, "a b c d", target=" a", method="attnlrp", rules="cp-lrp")
    >>> d = r.diagnostics
    >>> abs(d["conservation_error"]) < 1e-3 * max(1.0, abs(d["value"]))
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..lrp import ATTNLRP, CP_LRP, Composite, Ledger, propagation, resolve_composite
from ..result import Attribution
from ..units.sources import reduce_logprobs
from .base import register
from .context_baselines import SourceMethod
from .gradient import INPUT_KINDS, AttributionPatching, InputXGradient, _row_list

COMPONENT_KINDS = ("heads", "attn", "mlp", "neurons", "resid", "layers", "features")


class _RulesParams:
    """Methods with relevance rules record them in their parameters."""

    rules: Composite

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = super().params()  # type: ignore[misc]
        p["rules"] = self.rules.describe()
        return p


class _WithRules(_RulesParams):
    """Runs the gate-gradient path of an estimator under relevance rules."""

    def _path(self, bound: Any, alphas: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        with propagation(bound.lm, self.rules):
            return super()._path(bound, alphas, weights)  # type: ignore[misc]


@register("attnlrp")
class AttnLRP(_WithRules, InputXGradient):
    """AttnLRP over input units: the relevance ``x . grad_LRP`` of each token's
    embedding (words / sentences / spans: summed over their tokens), one forward
    and one backward per target row.

    Args:
        rules: a :class:`attrlab.lrp.Composite` or ``"attnlrp"`` (default),
            ``"cp-lrp"`` (no relevance through the attention weights),
            ``"gradient"`` (plain input x gradient).
        batch_size, max_new_tokens, progress, memory_budget: as for ``ig``.

    Diagnostics (per row): ``value`` (the target), ``relevance_sum`` (over the
    units), ``bias_share``, ``position_share``, ``softmax_share``,
    ``output_share`` and ``conservation_error`` (see :mod:`attrlab.methods.relevance`).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "When Mary and John went", target=" to", method="attnlrp")
        >>> len(r), r.params["rules"]["softmax"]
        (5, 'gradient')
    """

    only_kinds = INPUT_KINDS

    def __init__(self, rules: Composite | str = ATTNLRP, **options: Any):
        self.rules = resolve_composite(rules)
        super().__init__(**options)

    def estimate(self, bound: Any) -> tuple[Tensor, dict[str, Any]]:
        ledger = Ledger()
        with propagation(bound.lm, self.rules, ledger):
            grads, vals = InputXGradient._path(self, bound, torch.ones(1), torch.ones(1))
        values = [float(v) for v in vals[0]]
        sums = [float(s) for s in grads.double().sum(-1)]
        diag: dict[str, Any] = {
            "value": _row_list(vals[0]),
            "relevance_sum": _row_list(torch.tensor(sums)),
        }
        diag.update(_shares(ledger, values, sums))
        return grads, diag


def _shares(ledger: Ledger, values: list[float], sums: list[float]) -> dict[str, Any]:
    """The conservation diagnostics of ``attnlrp`` from a ledger with one row per value."""
    if len(ledger.rows) != len(values):
        return {}
    ledger.close_rows(values, inputs=sums)
    diag: dict[str, Any] = {}
    for key in ("bias", "position", "softmax", "output"):
        diag[f"{key}_share"] = _row_list(torch.tensor([row[key] for row in ledger.rows]))
    err = [v - s - row.total() for v, s, row in zip(values, sums, ledger.rows)]
    diag["conservation_error"] = _row_list(torch.tensor(err))
    if ledger.softmax_unrecorded:
        diag["note"] = (
            "fused (sdpa) attention: the softmax's share is not recorded and is "
            "part of conservation_error; load with attn_implementation='eager' to see it"
        )
    return diag


@register("attnlrp", ("sources",))
class AttnLRPSources(_RulesParams, SourceMethod):
    """AttnLRP over the sources of a prompt: the relevance of each source's tokens
    for the response's value (the kind's ``output``: its log-probability by
    default; one row per response token with ``per_token=True``). One forward
    of context plus response, one backward per row.

    Diagnostics as for ``attnlrp`` over tokens, plus ``relevance_outside``
    (relevance of the tokens outside every source: template, query, and the
    response's own earlier tokens) and ``token_ranges``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "A is red. B is blue.", " red", units="sources", method="attnlrp")
        >>> len(r), abs(r.diagnostics["conservation_error"]) < 1e-3
        (2, True)
    """

    def __init__(self, rules: Composite | str = ATTNLRP, **common: Any):
        self.rules = resolve_composite(rules)
        super().__init__(**common)

    def attribute(
        self, lm: Any, inputs: Any, target: Any, units: Any, counterfactual: Any = None
    ) -> Attribution:
        bound = self.prepare(lm, inputs, target, units, counterfactual)
        prompt = bound.prompt
        ids, ranges = prompt.source_token_ranges()
        resp = list(prompt.response_ids)
        p, n = len(ids), len(resp)
        full = torch.tensor([ids + resp], device=lm.device)
        output = bound.output or "log_prob"
        ledger = Ledger()
        with lm.lock, propagation(lm, self.rules, ledger), torch.enable_grad():
            e = lm.embed_ids(full).detach().requires_grad_(True)  # [1, pos, d]
            logits = lm.model(inputs_embeds=e).logits[0, p - 1 : p + n - 1]  # [n, vocab]
            picked = torch.tensor(resp, device=logits.device)[:, None]
            lp = logits.double().log_softmax(-1).gather(-1, picked)[:, 0]  # [n]
            rows = [lp[i : i + 1] for i in range(n)] if units.per_token else [lp]
            values = [reduce_logprobs(r[None], output)[0] for r in rows]
            rel = []
            for i, v in enumerate(values):
                (g,) = torch.autograd.grad(v, e, retain_graph=i + 1 < len(values))
                rel.append((e.detach() * g).sum(-1)[0].double().cpu())  # [pos]
        per_pos = torch.stack(rel)  # [rows, pos]
        scores = torch.stack([per_pos[:, a:b].sum(-1) for a, b in ranges], -1)  # [rows, n_src]
        vals = [float(v.detach()) for v in values]
        sums = [float(t) for t in per_pos.sum(-1)]
        diag: dict[str, Any] = {
            "value": _row_list(torch.tensor(vals)),
            "relevance_sum": _row_list(torch.tensor(sums)),
            "relevance_outside": _row_list(per_pos.sum(-1) - scores.sum(-1)),
            "token_ranges": [list(r) for r in ranges],
        }
        diag.update(_shares(ledger, vals, sums))
        bound.target_name = f"response_{output}({prompt.response!r})"
        result: Attribution = bound.result(
            scores if units.per_token else scores[0], self, diag,
            extra={"token_relevance": per_pos},
        )  # fmt: skip
        return result


@register("relp")
class RelP(_WithRules, AttributionPatching):
    """Relevance patching: attribution patching with LRP propagation coefficients,
    ``(a - a_ablated) . grad_LRP`` per unit, on components and edges. A
    first-order estimate of occlusion / activation patching with the same
    ablation; contributions (``r.effect_of_patching()`` for the other sign).

    Args:
        rules: a :class:`attrlab.lrp.Composite` or ``"cp-lrp"`` (default: the RelP
            paper's rules — LN rule, identity rule, 0-rule for linear layers,
            no relevance through the attention weights, half rule for gates)
            or ``"attnlrp"``.
        direction: ``"noising"`` (default) or ``"denoising"``, as for ``atp``.
        site: for heads, ``"z"`` (default), ``"q"``, ``"k"``, ``"v"``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "When Mary and John went", target=(" Mary", " John"),
        ...                  units="mlp", method="relp", counterfactual="When John and Mary went")
        >>> len(r) == lm.cfg.n_layers
        True
    """

    only_kinds: tuple[str, ...] = (*COMPONENT_KINDS, "edges")  # type: ignore[assignment]

    def __init__(self, rules: Composite | str = CP_LRP, direction: str = "noising", **options: Any):
        self.rules = resolve_composite(rules)
        super().__init__(direction=direction, **options)
