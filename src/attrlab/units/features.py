"""Features of sparse dictionaries (SAEs, transcoders) as units.

``al.units.Features(dictionaries)``: one unit per (dictionary, position,
feature) active in the clean run or in its ablation (so that ablating every
unit is ablating the whole site), plus — so that nothing is lost — one
**error** unit per dictionary and position: the part of the output site the
dictionary does not reconstruct (``y - decode(encode(x))``). The model runs
unchanged; at each dictionary's output site the activation is rewritten as

``y' = y - decode_lin((1 - g) * (a - a0)) - (1 - g_err) * (err - err0)``

where ``a`` and ``err`` are the features and error computed from the *live*
input of this very run (so ablating an upstream feature changes what a
downstream dictionary sees), ``a0`` / ``err0`` their ablated values and ``g``
the units' gates (1 for features that are not units). With every gate at 1 the
site is untouched, exactly; ``f(keep)`` uses 0/1 gates and ``f_gated`` any gates
in [0, 1], differentiable, so every estimator runs over features: occlusion,
Shapley, KernelSHAP, the linear surrogates, input x gradient, IG, AtP, RelP.

Ablations: ``Zero`` (``a0 = 0``, ``err0 = 0``), ``Counterfactual(inputs)`` (the
counterfactual run's features and error at the same positions; same token
length), ``Mean(reference)`` (their mean over the reference prompts' positions).

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> d = al.dictionaries.Dictionary.random(lm.cfg.d_model, 64, "blocks.1.resid_pre", seed=0)
    >>> r = al.attribute(lm, "a b c", target=" a", units=al.units.Features(d), method="occlusion")
    >>> set(r.to_pandas()["unit"]) == {"feature", "error"}
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..ablations import Ablation, Counterfactual, Mean, Zero
from ..errors import InputError
from ..model.interventions import Intervention
from .base import Bound, Units, register_units

__all__ = ["Features", "FeaturesBound"]


@register_units("features")
class Features(Units):
    """Dictionary features (and error terms) as units.

    Args:
        dictionaries: one :class:`attrlab.dictionaries.Dictionary` or a list
            (each reads its ``in_site`` and rewrites its ``out_site``).
        positions: token positions whose features are units (default all;
            negative indices count from the end).
        errors: add one error unit per dictionary and position (default True).
        threshold: a feature is a unit where its clean (or ablated) activation
            exceeds this in absolute value for some prompt.

    Example:
        >>> import attrlab as al
        >>> d = al.dictionaries.Dictionary.random(32, 64, "blocks.0.resid_pre")
        >>> Features(d, positions=[-1]).params()["sites"]
        ['blocks.0.resid_pre']
    """

    provides = frozenset({"f", "gates"})
    ablations = (Zero, Counterfactual, Mean)

    def __init__(self, dictionaries: Any = None, positions: Sequence[int] | None = None,
                 errors: bool = True, threshold: float = 0.0):  # fmt: skip
        from ..dictionaries import Dictionary

        ds = [] if dictionaries is None else (
            [dictionaries] if isinstance(dictionaries, Dictionary) else list(dictionaries)
        )  # fmt: skip
        if not all(isinstance(d, Dictionary) for d in ds):
            raise InputError("Features takes al.dictionaries.Dictionary objects")
        outs = [d.out_site for d in ds]
        if len(set(outs)) != len(outs):
            raise InputError("two dictionaries write the same site; give one per output site")
        self._dicts = ds
        self.positions = None if positions is None else [int(p) for p in positions]
        self.errors = bool(errors)
        self.threshold = float(threshold)

    @property
    def dictionaries(self) -> list[Any]:
        return list(self._dicts)

    def params(self) -> dict[str, Any]:
        return {
            "sites": [d.out_site for d in self._dicts],
            "in_sites": [d.in_site for d in self._dicts],
            "widths": [d.width for d in self._dicts],
            "positions": self.positions,
            "errors": self.errors,
            "threshold": self.threshold,
        }

    def bind(self, lm: Any, inputs: Any, target: Any, ablation: Ablation | None = None,
             batch_size: int | None = None, progress: bool = False, **_: Any) -> FeaturesBound:  # fmt: skip
        """The features bound to a question (see the module docs)."""
        if not self._dicts:
            raise InputError("Features needs dictionaries: al.units.Features(dictionary or list)")
        for d in self._dicts:
            for s in (d.in_site, d.out_site):
                if s not in lm.sites():
                    raise InputError(f"dictionary site {s!r} is not a site of this model")
            if d.d_in != lm.cfg.d_model or d.d_out != lm.cfg.d_model:
                raise InputError(f"dictionary on {d.in_site} is {d.d_in} -> {d.d_out} wide; "
                                 f"the model's d_model is {lm.cfg.d_model}")  # fmt: skip
        return FeaturesBound(self, lm, inputs, target, self.check_ablation(ablation),
                             batch_size, progress)  # fmt: skip


class FeaturesBound(Bound):
    """:class:`Features` bound to a question (see the module docs)."""

    def __init__(self, units: Features, lm: Any, inputs: Any, target: Any,
                 ablation: Ablation | None, batch_size: int | None, progress: bool):  # fmt: skip
        self.units, self.lm, self.ablation, self.target = units, lm, ablation, target
        self.dicts = units.dictionaries
        target.bind(lm)
        self.batch = target.prepare(lm, lm.tokenize(inputs))
        self.n_rows = 1
        self.target_name = target.describe()
        self.batch_size = batch_size or 16
        self.progress = progress
        b, P = self.batch.shape
        pos = list(range(P)) if units.positions is None else units.positions
        bad = [p for p in pos if not -P <= p < P]
        if bad:
            raise InputError(f"positions {bad} out of range for {P} tokens")
        self.positions = sorted({p % P for p in pos})
        acts, errs = self._encode(self.batch)
        self.clean_acts = acts
        self.a0, self.e0 = self._ablated(b, P)
        toks = (
            lm.to_str_tokens(self.batch.input_ids[0])
            if lm.tokenizer is not None
            else [str(int(t)) for t in self.batch.input_ids[0]]
        )
        self.tokens = toks
        self._labels: dict[str, list[Any]] = {k: [] for k in ("site", "position", "token",
                                                               "unit", "feature")}  # fmt: skip
        # per dictionary: unit ids of features [n_k] at (pos, feat), of errors at pos
        self.slots: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = []
        uid = 0
        for k, d in enumerate(self.dicts):
            fp, fi, fu, ep, eu = [], [], [], [], []
            for p in self.positions:
                a0 = self.a0[k][:, min(p, self.a0[k].shape[1] - 1)]  # [b | 1, width]
                on = (acts[k][:, p].abs() > units.threshold).any(0)
                on |= (a0.abs() > units.threshold).any(0) & (a0 != acts[k][:, p]).any(0)
                active = on.nonzero()[:, 0].tolist()
                for i in active:
                    fp.append(p)
                    fi.append(i)
                    fu.append(uid)
                    self._add_label(d.out_site, p, toks[p], "feature", i)
                    uid += 1
                if units.errors:
                    ep.append(p)
                    eu.append(uid)
                    self._add_label(d.out_site, p, toks[p], "error", -1)
                    uid += 1
            as_t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
            self.slots.append((as_t(fp), as_t(fi), as_t(fu), as_t(ep), as_t(eu)))
        self.n = uid
        if self.n == 0:
            raise InputError("no active feature at the chosen positions (and errors=False)")
        self.n_forwards = 1

    def _add_label(self, site: str, p: int, tok: str, kind: str, feat: int) -> None:
        lab = self._labels
        for key, value in (("site", site), ("position", p), ("token", tok), ("unit", kind),
                           ("feature", feat)):  # fmt: skip
            lab[key].append(value)

    @torch.no_grad()
    def _encode(self, batch: Any) -> tuple[list[Tensor], list[Tensor]]:
        """Clean features ``[b, P, width]`` and errors ``[b, P, d]`` per dictionary."""
        sites = list(dict.fromkeys(s for d in self.dicts for s in (d.in_site, d.out_site)))
        _, cache = self.lm.run(batch, cache=sites)
        acts, errs = [], []
        for d in self.dicts:
            ct = torch.promote_types(cache[d.in_site].dtype, torch.float32)
            x, y = cache[d.in_site].to(ct), cache[d.out_site].to(ct)
            a = d.encode(x)
            acts.append(a)
            errs.append(y - d.decode(a, x))
        return acts, errs

    def _ablated(self, b: int, P: int) -> tuple[list[Tensor], list[Tensor]]:
        """``a0`` ``[b | 1, P | 1, width]`` and ``err0`` per dictionary."""
        abl = self.ablation
        if abl is None or isinstance(abl, Zero):
            return ([torch.zeros(1, 1, d.width) for d in self.dicts],
                    [torch.zeros(1, 1, d.d_out) for d in self.dicts])  # fmt: skip
        if isinstance(abl, Counterfactual):
            cf = self.target.prepare(self.lm, self.lm.tokenize(abl.inputs))
            if cf.shape[1] != P or cf.shape[0] not in (1, b):
                raise InputError(f"the counterfactual has shape {tuple(cf.shape)}; features need "
                                 f"the prompts' shape {(b, P)} (same token length)")  # fmt: skip
            return self._encode(cf)
        if isinstance(abl, Mean):
            if abl.reference is None:
                raise InputError("a mean ablation over features needs reference= prompts")
            acts, errs = self._encode(self.lm.tokenize(abl.reference))
            return ([a.mean((0, 1), keepdim=True) for a in acts],
                    [e.mean((0, 1), keepdim=True) for e in errs])  # fmt: skip
        raise InputError(f"features take zero, counterfactual or mean ablations, not {abl!r}")

    # ------------------------------------------------------------ the contract
    def labels(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in self._labels.items()}

    def meta(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "ids": self.batch.input_ids[0].tolist()}

    def _gates(self, g: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Per-row feature gates ``[m, P, width]`` and error gates ``[m, P, 1]``
        of dictionary ``k`` (1 where a feature is not a unit)."""
        d = self.dicts[k]
        m, P = g.shape[0], self.batch.shape[1]
        fp, fi, fu, ep, eu = self.slots[k]
        G = torch.ones(m, P, d.width, dtype=g.dtype)
        if len(fu):
            G = G.index_put((torch.arange(m)[:, None], fp[None], fi[None]), g[:, fu])
        Ge = torch.ones(m, P, 1, dtype=g.dtype)
        if len(eu):
            Ge = Ge.index_put((torch.arange(m)[:, None], ep[None], torch.zeros_like(ep)[None]),
                              g[:, eu])  # fmt: skip
        return G, Ge

    def _run(self, g: Tensor) -> Tensor:
        """Mean target over prompts ``[m]`` at gates ``g [m, n]`` (differentiable)."""
        out = []
        b = self.batch.shape[0]
        for s in range(0, g.shape[0], self.batch_size):
            gg = g[s : s + self.batch_size]
            m = gg.shape[0]
            rows = self.batch.repeat(m)  # row i * m + j: prompt i, gates j
            ivs: list[Intervention] = []
            live: dict[str, Tensor] = {}
            for k, d in enumerate(self.dicts):
                G, Ge = self._gates(gg, k)
                G, Ge = G.repeat(b, 1, 1), Ge.repeat(b, 1, 1)  # [rows, P, .]
                a0 = self.a0[k].repeat_interleave(m, 0) if self.a0[k].shape[0] > 1 else self.a0[k]
                e0 = self.e0[k].repeat_interleave(m, 0) if self.e0[k].shape[0] > 1 else self.e0[k]
                if d.in_site != d.out_site:
                    ivs.append(Intervention(d.in_site, recorder(live, d.in_site)))
                ivs.append(Intervention(d.out_site, _rewriter(d, live, G, Ge, a0, e0)))
            logits, _ = self.lm.run(rows, interventions=ivs, grad=torch.is_grad_enabled())
            vals = self.target(logits, rows)
            out.append(vals.double().reshape(b, m).mean(0))
            self.n_forwards += 1
        return torch.cat(out)

    def f(self, keep: Tensor) -> Tensor:
        keep = self.check_keep(keep)
        with torch.no_grad():
            return self._run(keep.float()).cpu()[:, None]

    def f_gated(self, g: Tensor) -> Tensor:
        return self._run(self.check_gates(g).float())[:, None]

    def run_stats(self) -> dict[str, Any]:
        return {"n_forwards": self.n_forwards}


def recorder(live: dict[str, Tensor], site: str) -> Any:
    """An intervention function that records the site's live value in ``live[site]``."""

    def fn(x: Tensor) -> Tensor:
        live[site] = x
        return x

    return fn


def _rewriter(
    d: Any, live: dict[str, Tensor], G: Tensor, Ge: Tensor, a0: Tensor, e0: Tensor
) -> Any:
    """The output site rewritten with the gated features and error (see the module docs)."""

    def fn(y: Tensor) -> Tensor:
        x = live.get(d.in_site, y) if d.in_site != d.out_site else y
        ct = torch.promote_types(y.dtype, torch.float32)
        xf, yf = x.to(ct), y.to(ct)
        a = d.encode(xf)
        err = yf - d.decode(a, xf)
        keep = G.to(y.device, ct)
        da = (1 - keep) * (a - a0.to(y.device, ct))  # what the ablation removes from the features
        de = (1 - Ge.to(y.device, ct)) * (err - e0.to(y.device, ct))
        change = da @ d.W_dec.to(y.device, ct) + de
        return y - change.to(y.dtype)  # exactly y where every gate is 1

    return fn
