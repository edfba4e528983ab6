"""Randomization sanity check ("Sanity checks for saliency maps", Adebayo et al.).

Run the same method, with the same options, units and target, on a copy of the
model whose weights are re-initialized, and report the rank correlation with
the original attribution. A method whose scores barely change when the model's
weights are destroyed explains the input, not the model. (See also
"Shortcomings of Top-Down Randomization-Based Sanity Checks for Evaluations of
Deep Neural Network Explanations": a low correlation is necessary, not
sufficient, for a faithful method.)

Re-initialization keeps every parameter tensor's mean and standard deviation
(``w <- mean(w) + std(w) * N(0, 1)``, seeded), so activations keep their scale
and nothing architecture-specific is needed.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "When Mary and John went", target=" to", method="ig", steps=8)
    >>> c = al.evaluate.randomization_check(lm, r, "When Mary and John went", target=" to")
    >>> -1.0 <= c.spearman <= 1.0
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..model.lock import holds_model_lock
from .lds import spearman, units_of

__all__ = ["RandomizationCheck", "randomization_check", "randomize_weights"]


@dataclass
class RandomizationCheck:
    """Result of :func:`randomization_check`.

    Attributes:
        spearman: rank correlation of the scores (flattened over rows) between
            the trained and the randomized model.
        spearman_abs: the same on absolute scores (saliency-style comparison).
        randomized: the attribution on the randomized model.

    Example:
        >>> RandomizationCheck(0.1, 0.2).spearman
        0.1
    """

    spearman: float
    spearman_abs: float
    randomized: Any = field(default=None, repr=False)


@holds_model_lock
def randomize_weights(
    model: nn.Module, seed: int = 0, include: Sequence[str] | None = None
) -> nn.Module:
    """A deep copy of ``model`` with re-initialized parameters (each tensor keeps its
    mean and std). ``include``: only parameters whose name contains one of these
    substrings (e.g. ``["h.11.", "h.10."]`` for a cascading check).

    Example:
        >>> import torch, attrlab as al
        >>> hf, _ = al.testing.tiny_model("gpt2")
        >>> r = randomize_weights(hf, seed=0)
        >>> bool(torch.equal(r.transformer.wte.weight, hf.transformer.wte.weight))
        False
    """
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in new.named_parameters():
            if include is not None and not any(s in name for s in include):
                continue
            flat = p.detach().double()
            mean = float(flat.mean())
            std = float(flat.std()) if p.numel() > 1 else 0.0
            std = std if std > 0 else 0.02
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_((mean + std * noise).to(p.dtype))
    return new


@holds_model_lock
def randomization_check(
    lm: Any,
    result: Any,
    inputs: Any = None,
    target: Any = None,
    seed: int = 0,
    include: Sequence[str] | None = None,
    units: Any = None,
    method: Any = None,
    counterfactual: Any = None,
    ablation: Any = None,
    reference: Any = None,
    **options: Any,
) -> RandomizationCheck:
    """Re-run ``result``'s method on a randomized copy of ``lm``; return the rank
    correlation of the two attributions.

    Works on every result :func:`attrlab.attribute` can recompute: tokens,
    sources, components (heads, MLPs …) and edges.

    Args:
        result: the attribution on the trained model.
        inputs, target, counterfactual: what ``result`` explains; read from the
            result when left out (given ones must match it). A default (top-token)
            target is fixed to the trained model's top token, so both models
            explain the same logit.
        ablation, reference: the ablation of the re-run (default: the one the
            result used, read from its question; give it again when it cannot be
            rebuilt, e.g. a tensor).
        seed, include: see :func:`randomize_weights`.
        units: the unit object (default: rebuilt from the result).
        method: method name or object (default: ``result.method`` with ``result.params``,
            updated by ``options``).

    Raises:
        QuestionMismatchError: a prompt, target or counterfactual the result does not explain.
        InputError: the method cannot be re-run from the result (training-data
            results; an option that was a tensor and is not saved: pass it again).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", method="occlusion")
        >>> c = al.evaluate.randomization_check(lm, r, "a b c", " a", seed=1)
        >>> c.randomized.method
        'occlusion'
        >>> h = al.attribute(lm, "a b c", target=" a", units="heads", method="atp",
        ...                  counterfactual="a c c")
        >>> al.evaluate.randomization_check(lm, h).randomized.unit_kind
        'heads'
    """
    from ..attribute import attribute
    from ..question import bind

    model = getattr(lm, "model", None)
    if not isinstance(model, nn.Module):
        raise InputError("randomization_check needs a wrapped model with a .model")
    if getattr(result, "unit_kind", None) == "train":
        raise InputError(
            "randomization_check cannot re-run a training-data attribution from the result "
            "(it needs the training set featurized again with the randomized model); "
            "featurize a randomized copy (randomize_weights) and compare the scores yourself"
        )
    q = bind(lm, result, inputs, target, counterfactual, units, "run a randomization check on")
    u = units_of(result, units)
    if method is None:
        name: Any = result.method
        params = {k: v for k, v in result.params.items() if k != "units"}
        params.update(options)
        lost = [k for k, v in params.items() if _is_placeholder(v)]
        if lost:
            raise InputError(
                f"the result's option(s) {', '.join(lost)} were tensors and are not saved "
                f"with it; pass them again: randomization_check(..., {lost[0]}=...)"
            )
    else:
        name, params = method, dict(options)
    abl = None  # the result's own ablation (a counterfactual stays counterfactual=)
    if ablation is not None or reference is not None:
        abl = q.resolved_ablation(ablation, reference=reference)
    elif q.ablation is not None:
        abl = q.ablation
    tgt = _fixed_target(lm, q.inputs, q.target, result, params)
    rand_model = randomize_weights(model, seed, include)
    if hasattr(lm, "with_model"):
        rand_lm = lm.with_model(rand_model)
    else:
        from ..model.loading import wrap

        rand_lm = wrap(rand_model, lm.tokenizer, name=f"{lm.name} (randomized)")
    rand = attribute(
        rand_lm, q.inputs, target=tgt, units=u, method=name,
        counterfactual=q.counterfactual if abl is None else None, ablation=abl, **params,
    )  # fmt: skip
    a = torch.as_tensor(result.scores).double().reshape(-1)
    b = torch.as_tensor(rand.scores).double().reshape(-1)
    if a.shape != b.shape:
        raise InputError(f"score shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return RandomizationCheck(spearman(a, b), spearman(a.abs(), b.abs()), rand)


def _fixed_target(lm: Any, inputs: Any, target: Any, result: Any, params: dict[str, Any]) -> Any:
    """A default (top-token) target fixed to the trained model's prediction."""
    from ..targets import TopToken

    q = (getattr(result, "meta", {}) or {}).get("question") or {}
    if target is not None or q.get("target_kind", "lm") != "lm" or params.get("max_new_tokens"):
        return target
    if not hasattr(lm, "tokenize"):
        return target
    t = TopToken()
    t.prepare(lm, lm.tokenize(inputs))
    ids = torch.as_tensor(t.ids).reshape(-1).tolist()
    return int(ids[0]) if len(ids) == 1 else [int(i) for i in ids]


def _is_placeholder(v: Any) -> bool:
    return isinstance(v, str) and v.startswith("tensor(")
