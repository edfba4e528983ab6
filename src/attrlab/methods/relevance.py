"""Relevance propagation: the gradient estimators run with LRP rules.

Both methods are the gate-gradient estimators of :mod:`attrlab.methods.gradient`
run inside :func:`attrlab.lrp.propagation`, so every gradient through the model
follows the rules of a :class:`attrlab.lrp.Composite` (AttnLRP by default):

- ``attnlrp`` (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance
  Propagation for Transformers"): input x gradient over token gates with the
  zero ablation, i.e. ``x . grad`` at the token embeddings; words, sentences and
  spans sum their tokens. One forward and one backward per target row (a
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
from .base import register
from .gradient import INPUT_KINDS, AttributionPatching, InputXGradient, _row_list

COMPONENT_KINDS = ("heads", "attn", "mlp", "neurons", "resid", "layers")


class _WithRules:
    """Runs the gate-gradient path of an estimator under relevance rules."""

    rules: Composite

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

    def params(self) -> dict[str, Any]:
        p = super().params()
        p["rules"] = self.rules.describe()
        return p

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
        if len(ledger.rows) == len(values):
            ledger.close_rows(values, inputs=sums)
            for key in ("bias", "position", "softmax", "output"):
                diag[f"{key}_share"] = _row_list(torch.tensor([row[key] for row in ledger.rows]))
            err = [v - s - row.total() for v, s, row in zip(values, sums, ledger.rows)]
            diag["conservation_error"] = _row_list(torch.tensor(err))
            if ledger.softmax_unrecorded:
                diag["note"] = (
                    "fused (sdpa) attention: the softmax's share is not recorded and is "
                    "part of conservation_error; load with attn_implementation='eager' to see it"
                )
        return grads, diag


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

    def params(self) -> dict[str, Any]:
        p = super().params()
        p["rules"] = self.rules.describe()
        return p
