"""Component units: the places inside the model that methods score.

Each kind says which layers (and heads, neurons) it covers and whether it is
per position. Bound to a question (:meth:`Units.bind`) a kind gives
:class:`ComponentBound`: ``f(keep)`` replaces the units that are not kept by
their ablated values (zero, mean, resampled, counterfactual or noised run) in
batched forwards that start at each row's earliest ablated layer and reuse
the key/value cache before its earliest ablated position
(:mod:`attrlab.model.masked`); ``f_gated(g)`` mixes actual and ablated
values with differentiable gates. Labels come from here only
(:func:`locations`), in one order: layer, then head / neuron, then position.

Example:
    >>> import attrlab as al
    >>> al.units.Heads(layers=[1], per_position=True).kind
    'heads'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..ablations import Ablation, Counterfactual, Mean, Noise, Resample, Zero
from ..errors import (
    CounterfactualWarning,
    IndexRangeError,
    InputError,
    SiteNotExposedError,
    UnsupportedArchitectureError,
)
from ..model.interventions import Intervention
from ..model.masked import MaskedRunner, SiteUnit
from .base import Bound, Units, register_units

__all__ = [
    "Heads",
    "Layers",
    "AttnOut",
    "MlpOut",
    "Resid",
    "Neurons",
    "Experts",
    "ComponentBound",
    "locations",
    "label_columns",
    "donor_values",
    "noise_interventions",
    "embedding_std",
]


class _Component(Units):
    provides = frozenset({"f", "gates"})
    ablations = (Zero, Counterfactual, Mean, Resample, Noise)

    def __init__(self, layers: Sequence[int] | None = None, per_position: bool = False):
        self.layers = list(layers) if layers is not None else None
        self.per_position = per_position

    def layer_list(self, n_layers: int) -> list[int]:
        """The selected layers, validated against the model."""
        if self.layers is None:
            return list(range(n_layers))
        out = []
        for layer in self.layers:
            if not -n_layers <= layer < n_layers:
                raise IndexRangeError(
                    f"layer {layer} out of range; the model has {n_layers} layers"
                )
            out.append(layer % n_layers)
        return out

    @staticmethod
    def _indices(chosen: list[int] | None, size: int, what: str, owner: str) -> list[int]:
        """``chosen`` (default ``range(size)``) validated: ``what`` indices below ``size``.

        Example:
            >>> _Component._indices([1], 4, "expert", "the MLPs have")
            [1]
        """
        if chosen is None:
            return list(range(size))
        for i in chosen:
            if not 0 <= i < size:
                raise IndexRangeError(f"{what} {i} out of range; {owner} {size} {what}s")
        return list(chosen)


@register_units("heads")
class Heads(_Component):
    """Attention heads (``blocks.{l}.attn`` head ``h``), optionally per position."""

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        per_position: bool = False,
    ):
        super().__init__(layers, per_position)
        self.heads = list(heads) if heads is not None else None

    def head_list(self, n_heads: int) -> list[int]:
        return self._indices(self.heads, n_heads, "head", "the model has")


@register_units("layers")
class Layers(_Component):
    """Whole blocks: embeddings, then attention and MLP output of each layer."""


@register_units("attn")
class AttnOut(_Component):
    """Attention output (``blocks.{l}.attn.out``) per layer (and position)."""


@register_units("mlp")
class MlpOut(_Component):
    """MLP output (``blocks.{l}.mlp.out``) per layer (and position)."""


@register_units("resid")
class Resid(_Component):
    """Residual stream ``blocks.{l}.resid_pre`` per layer and position."""

    def __init__(self, layers: Sequence[int] | None = None, per_position: bool = True):
        super().__init__(layers, per_position)


@register_units("neurons")
class Neurons(_Component):
    """MLP neurons (``blocks.{l}.mlp.neurons``); ``neurons`` selects some (default all).

    Example:
        >>> Neurons(layers=[0], neurons=[3, 7]).neurons
        [3, 7]
    """

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        neurons: Sequence[int] | None = None,
        per_position: bool = False,
    ):
        super().__init__(layers, per_position)
        self.neurons = list(neurons) if neurons is not None else None

    def neuron_list(self, d_mlp: int) -> list[int]:
        """The selected neurons, validated against the MLP width."""
        return self._indices(self.neurons, d_mlp, "neuron", "the MLPs have")


@register_units("experts")
class Experts(_Component):
    """Experts of mixture-of-experts MLPs: expert ``e`` of layer ``l`` is slot ``e``
    of ``blocks.{l}.mlp.experts`` (its routing-weighted output; zero at tokens
    not routed to it). A shared expert (Qwen2-MoE) is the last slot, number
    ``cfg.n_experts``. ``layers`` default to every MoE layer; ``experts`` select
    some (default all). Models without experts raise
    :class:`~attrlab.errors.UnsupportedArchitectureError` when bound.

    ``site="router"`` makes the units the router's logits instead (logit ``e`` of
    ``blocks.{l}.mlp.router``, routed experts only): ablating one re-routes the
    tokens (the routing weights are recomputed from the edited logits), so the
    score says how much the router's preference for that expert matters. Not
    for DLA (router logits write nothing to the residual stream).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("mixtral"))
        >>> r = al.attribute(lm, "a b c", target=" a", units="experts", method="dla")
        >>> len(r) == lm.cfg.n_layers * lm.cfg.n_experts
        True
        >>> r = al.attribute(lm, "a b c", target=" a", method="occlusion",
        ...                  units=al.units.Experts(site="router"))
        >>> len(r) == lm.cfg.n_layers * lm.cfg.n_experts
        True
    """

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        experts: Sequence[int] | None = None,
        per_position: bool = False,
        site: str = "experts",
    ):
        if site not in ("experts", "router"):
            raise InputError(
                f"Experts(site=...) is 'experts' (their outputs) or 'router' (its logits), "
                f"got {site!r}"
            )
        super().__init__(layers, per_position)
        self.experts = list(experts) if experts is not None else None
        self.site = site

    def expert_list(self, n_experts: int) -> list[int]:
        """The selected experts, validated against the number of slots."""
        return self._indices(self.experts, n_experts, "expert", "the MoE MLPs have")

    def moe_layers(self, lm: Any) -> list[int]:
        """The selected layers, all mixture-of-experts layers of ``lm``.

        Raises:
            UnsupportedArchitectureError: the model has no experts.
            InputError: a selected layer has a dense MLP.
        """
        c = lm.cfg
        moe = [layer for layer in range(c.n_layers) if lm.has_experts(layer)]
        if not moe:
            raise UnsupportedArchitectureError(
                f"units='experts': model {lm.name!r} (family {c.family!r}) has no "
                "mixture-of-experts MLPs, so it has no experts. Use units='mlp' or 'neurons', "
                "or a MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)."
            )
        if self.layers is None:
            return moe
        layers = self.layer_list(c.n_layers)
        dense = [layer for layer in layers if layer not in moe]
        if dense:
            raise InputError(
                f"units='experts': layer(s) {dense} have dense MLPs (no experts); "
                f"the mixture-of-experts layers are {moe}"
            )
        return layers


# ------------------------------------------------------------------ binding
def _bind(
    self: _Component,
    lm: Any,
    inputs: Any,
    target: Any,
    ablation: Ablation | None = None,
    site: str = "z",
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = False,
    reuse_prefix: bool = True,
) -> ComponentBound:
    """Bind to a question: ``f`` / ``f_gated`` over these components.

    Args:
        site: for heads, the activation ablated: ``"z"`` (output, default),
            ``"q"``, ``"k"``, ``"v"``.
        batch_size, memory_budget, progress, reuse_prefix: see
            :class:`attrlab.model.masked.MaskedRunner`.

    Example:
        >>> import attrlab as al, torch
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> b = al.units.Heads().bind(lm, "a b c", al.targets.resolve(" a", lm))
        >>> b.n, tuple(b.f(torch.ones(1, b.n, dtype=torch.bool)).shape)
        (8, (1, 1))
    """
    return ComponentBound(
        self,
        lm,
        inputs,
        target,
        self.check_ablation(ablation),
        site=site,
        batch_size=batch_size,
        memory_budget=memory_budget,
        progress=progress,
        reuse_prefix=reuse_prefix,
    )


_Component.bind = _bind  # type: ignore[method-assign,assignment]


def locations(
    lm: Any, units: Units, n_pos: int, site: str = "z"
) -> tuple[list[SiteUnit], list[int], list[dict[str, Any]]]:
    """``(locations, unit number of each location, one label dict per unit)``
    for a component kind — the one labelling path for components.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> locs, unit_of, labels = locations(lm, al.units.Heads(layers=[0]), n_pos=5)
        >>> len(locs), labels[1]
        (4, {'layer': 0, 'head': 1})
    """
    c = lm.cfg
    layers = units.layer_list(c.n_layers) if isinstance(units, _Component) else []
    positions: list[int | None] = (
        list(range(n_pos)) if getattr(units, "per_position", False) else [None]
    )
    locs: list[SiteUnit] = []
    labels: list[dict[str, Any]] = []

    def add(loc: SiteUnit, **lab: Any) -> None:
        locs.append(loc)
        if loc.position is not None:
            lab["position"] = loc.position
        labels.append(lab)

    if isinstance(units, Heads):
        if site == "pattern":
            raise SiteNotExposedError(
                "patching blocks.{l}.attn.pattern is not supported: attention weights are "
                "read-only in attrlab. Use site='q' or site='k' (which change the pattern)."
            )
        if site not in ("z", "q", "k", "v", "head_out"):
            raise InputError(f"site must be 'z', 'q', 'k', 'v' or 'head_out', got {site!r}")
        n_idx = c.n_kv_heads if site in ("k", "v") else c.n_heads
        name = "kv_head" if site in ("k", "v") else "head"
        heads = units.head_list(n_idx)
        for layer in layers:
            for h in heads:
                for pos in positions:
                    add(SiteUnit(layer, f"attn.{site}", pos, h), layer=layer, **{name: h})
    elif isinstance(units, Neurons):
        for layer in layers:
            for n in units.neuron_list(c.d_mlp):
                for pos in positions:
                    add(SiteUnit(layer, "mlp.neurons", pos, n), layer=layer, neuron=n)
    elif isinstance(units, Experts):
        router = units.site == "router"  # the router's logits: routed experts only
        n_slots = c.n_experts if router else c.n_experts + c.n_shared_experts
        for layer in units.moe_layers(lm):
            for e in units.expert_list(n_slots):
                for pos in positions:
                    add(SiteUnit(layer, f"mlp.{units.site}", pos, e), layer=layer, expert=e)
    elif isinstance(units, (Resid, AttnOut, MlpOut)):
        kind = {Resid: "resid_pre", AttnOut: "attn.out", MlpOut: "mlp.out"}[type(units)]
        for layer in layers:
            for pos in positions:
                add(SiteUnit(layer, kind, pos), layer=layer)
    elif isinstance(units, Layers):
        unit_of: list[int] = []
        out_labels: list[dict[str, Any]] = []
        for pos in positions:
            if units.layers is None:
                locs.append(SiteUnit(0, "embed", pos))
                unit_of.append(len(out_labels))
                lab: dict[str, Any] = {"component": "embed", "layer": -1}
                out_labels.append(lab if pos is None else {**lab, "position": pos})
        for layer in layers:
            for pos in positions:
                for kind in ("attn.out", "mlp.out"):
                    locs.append(SiteUnit(layer, kind, pos))
                    unit_of.append(len(out_labels))
                lab = {"component": "block", "layer": layer}
                out_labels.append(lab if pos is None else {**lab, "position": pos})
        return locs, unit_of, out_labels
    else:
        raise InputError(f"units={units.kind!r} are not model components")
    if not locs:
        raise InputError("no component units selected")
    return locs, list(range(len(locs))), labels


def embedding_std(lm: Any, chunk: int = 8192) -> float:
    """Standard deviation of the token-embedding outputs over the whole vocabulary
    (the scale of causal tracing's noise is 3 x this).

    Example:
        >>> import attrlab as al
        >>> embedding_std(al.wrap(*al.testing.tiny_model("gpt2"))) > 0
        True
    """
    total, sq, n = 0.0, 0.0, 0
    with torch.no_grad():
        for s in range(0, lm.cfg.d_vocab, chunk):
            ids = torch.arange(s, min(s + chunk, lm.cfg.d_vocab), device=lm.device)[None]
            e = lm.embed_ids(ids).double()
            total += float(e.sum())
            sq += float((e * e).sum())
            n += e.numel()
    mean = total / n
    return float(max(sq / n - mean * mean, 0.0) ** 0.5)


def noise_interventions(lm: Any, batch: Any, ablation: Noise) -> list[Intervention]:
    """Causal tracing's corrupted run: seeded Gaussian noise added to the token
    embeddings (site ``embed``) at the ablation's positions.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> iv, = noise_interventions(lm, lm.tokenize("a b c"), Noise(std=1.0, positions=[1]))
        >>> iv.site, tuple(iv.value.shape)
        ('embed', (1, 1, 32))
    """
    n_pos = batch.shape[1]
    pos = list(range(n_pos)) if ablation.positions is None else list(ablation.positions)
    for p in pos:
        if not -n_pos <= p < n_pos:
            raise IndexRangeError(f"noise position {p} out of range for {n_pos} tokens")
    std = ablation.std if ablation.std is not None else 3.0 * embedding_std(lm)
    g = torch.Generator().manual_seed(ablation.seed)
    noise = torch.randn(batch.shape[0], len(pos), lm.cfg.d_model, generator=g) * std
    return [Intervention("embed", noise.to(lm.device, lm.dtype), op="add", positions=pos)]


def donor_values(
    lm: Any, batch: Any, ablation: Ablation | None, sites: list[str], prepare: Any
) -> tuple[dict[str, Tensor], Any]:
    """``(site -> ablated values [n_prompts | 1, pos, ...], ablated run's logits
    and batch or None)`` for an ablation. Zero has no donors (zeros are used).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> d, run = donor_values(lm, lm.tokenize("a b"), al.ablations.Zero(), ["blocks.0.attn.z"], None)
        >>> d, run
        ({}, None)
    """
    prep = prepare or (lambda b: b)
    if ablation is None or isinstance(ablation, Zero):
        return {}, None
    if isinstance(ablation, Mean):
        ref = prep(lm.tokenize(ablation.reference))
        _, cache = lm.run(ref, cache=sites, last_only=True)
        mask = ref.attention_mask.to(lm.dtype)  # [r, p]
        means = {}
        for s in sites:
            a = cache[s]  # [r, p, ...]
            if ref.shape[1] == batch.shape[1] and bool(ref.attention_mask.all()):
                means[s] = a.mean(0, keepdim=True)
            else:
                w = mask.reshape(*mask.shape, *([1] * (a.dim() - 2)))
                m = (a * w).sum((0, 1)) / mask.sum()
                means[s] = m.expand(1, batch.shape[1], *m.shape)
        return means, None
    ivs: list[Intervention] = []
    if isinstance(ablation, Noise):
        ivs = noise_interventions(lm, batch, ablation)
        cbatch = batch
    elif isinstance(ablation, Resample):
        ref = prep(lm.tokenize(ablation.reference))
        g = torch.Generator().manual_seed(ablation.seed)
        pick = torch.randint(0, ref.shape[0], (batch.shape[0],), generator=g)
        cbatch = ref[pick]
        lm.check_counterfactual(batch, cbatch)
    elif isinstance(ablation, Counterfactual):
        cbatch = lm.tokenize(ablation.inputs)
        if cbatch.shape[0] == 1 and batch.shape[0] > 1:
            cbatch = cbatch.repeat(batch.shape[0])
        cbatch = prep(cbatch)
        lm.check_counterfactual(batch, cbatch)
    else:
        raise InputError(f"components cannot use ablation {ablation.name!r}")
    with torch.no_grad():
        logits, cache = lm.run(cbatch, cache=sites, interventions=ivs)
    return dict(cache), (logits, cbatch)


def _tokens(lm: Any, batch: Any) -> list[str]:
    ids = batch.input_ids[0]
    return lm.to_str_tokens(ids) if lm.tokenizer is not None else [str(int(t)) for t in ids]


def label_columns(labels: list[dict[str, Any]], tokens: list[str]) -> dict[str, list[Any]]:
    """Label columns from :func:`locations`' per-unit labels (plus the token at
    each unit's position).

    Example:
        >>> label_columns([{"layer": 0, "position": 1}], ["a", "b"])
        {'layer': [0], 'position': [1], 'token': ['b']}
    """
    names = list(dict.fromkeys(k for lab in labels for k in lab))
    cols = {k: [lab.get(k, -1) for lab in labels] for k in names}
    if "position" in cols:
        cols["token"] = [tokens[p] if p >= 0 else "" for p in cols["position"]]
    return cols


def _same_tokens(a: Any, b: Any) -> bool:
    return (
        a.input_ids.shape == b.input_ids.shape
        and torch.equal(a.input_ids.cpu(), b.input_ids.cpu())
        and torch.equal(a.attention_mask.cpu(), b.attention_mask.cpu())
    )


class ComponentBound(Bound):
    """Component units bound to a question (see :meth:`_Component.bind`)."""

    def __init__(
        self,
        units: _Component,
        lm: Any,
        inputs: Any,
        target: Any,
        ablation: Ablation | None,
        site: str = "z",
        batch_size: int | None = None,
        memory_budget: int | str | None = None,
        progress: bool = False,
        reuse_prefix: bool = True,
    ):
        self.units, self.lm, self.ablation, self.target = units, lm, ablation, target
        target.bind(lm)
        self.batch = target.prepare(lm, lm.tokenize(inputs))
        n_pos = self.batch.shape[1]
        self.locs, unit_of, self._labels = locations(lm, units, n_pos, site)
        self.n = len(self._labels)
        self.n_rows = 1
        self.target_name = target.describe()
        sites = sorted({u.site for u in self.locs})
        self.donors, run = donor_values(
            lm, self.batch, ablation, sites, lambda b: target.prepare(lm, b)
        )
        self.ablated_run_value = None
        same = False
        if run is not None:
            logits, cbatch = run
            self.ablated_run_value = float(target(logits, cbatch).float().mean())
            same = isinstance(ablation, Counterfactual) and _same_tokens(self.batch, cbatch)
        self.runner = MaskedRunner(
            lm,
            self.batch,
            target,
            self.locs,
            self.donors,
            unit_of=unit_of,
            batch_size=batch_size,
            memory_budget=memory_budget,
            progress=progress,
            reuse_prefix=reuse_prefix,
        )
        self.identical = same
        if same:  # an identical counterfactual: the base run's own values, exactly
            import warnings

            self.runner.donors = {s: self.runner.base_cache[s] for s in sites}
            warnings.warn(
                "the counterfactual is the prompt itself: nothing is ablated and every "
                "score is zero. Use a counterfactual that changes the answer.",
                CounterfactualWarning,
                stacklevel=4,
            )

    def labels(self) -> dict[str, list[Any]]:
        return label_columns(self._labels, self._tokens())

    def _tokens(self) -> list[str]:
        return _tokens(self.lm, self.batch)

    def meta(self) -> dict[str, Any]:
        return {"tokens": self._tokens(), "n_forwards": self.runner.n_forwards}

    def clean(self) -> Tensor:
        return self.runner.base_value.reshape(1)

    def f(self, keep: Tensor) -> Tensor:
        return self.runner.values(self.check_keep(keep))[:, None]

    def f_gated(self, g: Tensor) -> Tensor:
        return self.runner.gated(self.check_gates(g).to(self.lm.device))[:, None]

    def gate_grad(self, g: Tensor) -> tuple[Tensor, Tensor]:
        if self.identical:  # nothing differs: every gate derivative is exactly zero
            g = self.check_gates(g)
            vals = self.clean().reshape(1, 1).expand(g.shape[0], 1)
            return vals, torch.zeros(g.shape[0], 1, self.n, dtype=torch.float64)
        return super().gate_grad(g)
