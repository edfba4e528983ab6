"""Masked runs: many variants of one prompt in batched forwards, each row
with its own set of site locations replaced by donor values (``f(keep)``) or
gated between the actual and the donor value (``f_gated(g)``).

A location is a :class:`SiteUnit`: a site (``blocks.3.attn.z``), a position
(None = every position) and an index on the site's unit axis (a head, a
key/value head, a neuron; None = the whole site). The engine knows nothing
about unit kinds or methods; component unit kinds build on it.

Speed (exact values, no approximation):

* rows are grouped by their **earliest ablated layer**: a group's forward
  starts at that layer from the base run's cached ``resid_pre`` (layers below
  are not recomputed);
* for per-position locations, rows are also ordered by their **earliest
  ablated position** and a forward reuses the base run's key/value cache of
  the positions before it, so a row recomputes only the positions at and
  after its first change (neighbouring positions share a forward only when
  the positions that sharing recomputes cost less than a forward's fixed
  cost, :func:`attrlab.model.budget.overhead_tokens`);
* rows per forward come from the cost model of :mod:`attrlab.model.budget`:
  enough tokens that a forward's fixed cost is small for this model's width
  (:func:`~attrlab.model.budget.efficient_rows`: more rows for a narrow model
  or a short prompt), no more than the memory budget allows; ``batch_size=``
  forces it;
* rows where nothing is ablated take the base value without a forward; only
  the last position is unembedded for next-token targets, and only the
  vocabulary columns the target reads (``Target.logit_columns``: a logit or a
  logit difference) when the unembedding is a plain linear map.

Example:
    >>> import torch, attrlab as al
    >>> from attrlab.model.masked import SiteUnit, MaskedRunner
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> t = al.targets.resolve(" a", lm)
    >>> b = lm.tokenize("a b c")
    >>> units = [SiteUnit(0, "attn.z", None, h) for h in range(lm.cfg.n_heads)]
    >>> run = MaskedRunner(lm, b, t, units, donors={})      # zero donors
    >>> keep = torch.ones(2, len(units), dtype=torch.bool); keep[1, 0] = False
    >>> v = run.values(keep)
    >>> tuple(v.shape), bool(v[0] == run.base_value)
    ((2,), True)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..targets import upcast
from .budget import batch_size_for, efficient_rows, overhead_tokens
from .interventions import Intervention
from .wrapper import LM, Batch

__all__ = ["SiteUnit", "MaskedRunner", "prefix_cache", "INDEX_AXES"]

#: site kinds a location may name, and the name of their unit axis (None: no axis)
INDEX_AXES: dict[str, str | None] = {
    "embed": None,
    "resid_pre": None,
    "attn.out": None,
    "mlp.out": None,
    "resid_mid": None,
    "resid_post": None,
    "attn.z": "head",
    "attn.q": "head",
    "attn.k": "kv_head",
    "attn.v": "kv_head",
    "attn.head_out": "head",
    "mlp.neurons": "neuron",
    "mlp.experts": "expert",
    "mlp.router": "expert",
}


@dataclass(frozen=True)
class SiteUnit:
    """One location: ``blocks.{layer}.{kind}`` (or ``embed``) at ``position``
    (None = every position) and ``index`` on its unit axis (None = all).

    Example:
        >>> SiteUnit(3, "attn.z", position=5, index=2).site
        'blocks.3.attn.z'
    """

    layer: int
    kind: str
    position: int | None = None
    index: int | None = None

    @property
    def site(self) -> str:
        return "embed" if self.kind == "embed" else f"blocks.{self.layer}.{self.kind}"


def _cropped(cache: Any, keep: int, n_pos: int, repeat: int) -> Any:
    """A copy of ``cache`` holding its first ``keep`` positions, each row repeated."""
    out = copy.deepcopy(cache)
    out.crop(keep - n_pos)  # a negative crop removes that many trailing positions
    if repeat > 1:
        out.batch_repeat_interleave(repeat)
    return out


def prefix_cache(lm: LM, batch: Batch) -> Any:
    """The key/value cache of a run of ``batch``, or None if this model's cache
    cannot be cropped to a prefix and repeated per row.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> prefix_cache(lm, lm.tokenize("a b c")) is not None
        True
    """
    try:
        with torch.no_grad():
            _, pkv = lm.hf_forward(
                batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=True,
            )
        if pkv is None or not getattr(pkv, "is_croppable", hasattr(pkv, "crop")):
            return None
        trial = _cropped(pkv, 1, batch.shape[1], 2)
        if trial.get_seq_length() != 1:
            return None
        return pkv
    except Exception:  # caches differ between versions and families: fall back
        return None


class MaskedRunner:
    """Evaluate a target with locations replaced (or gated) per row.

    Args:
        lm: the wrapped model.
        batch: the base prompts ``[n_prompts, pos]`` (prepared by the target).
        target: a bound :class:`~attrlab.targets.Target`; values are averaged over prompts.
        units: the locations.
        unit_of: the unit number of each location (default: one unit per
            location); a unit may cover several locations (a whole block).
        donors: site name -> donor values ``[n_prompts | 1, pos, ...]`` (the
            site's shape); a missing site means zeros.
        base_cache: site name -> the base run's values; computed when None.
        batch_size: rows per forward (None: the cost model, :func:`efficient_rows`
            rows of this prompt length, fewer if the memory budget says so).
        memory_budget, progress: see :mod:`attrlab.model.budget`; a tqdm bar.
        reuse_prefix: reuse the base run's key/value cache before the earliest
            change (next-token targets on models whose cache can be cropped).
    """

    def __init__(
        self,
        lm: LM,
        batch: Batch,
        target: Any,
        units: Sequence[SiteUnit],
        donors: dict[str, Tensor],
        *,
        unit_of: Sequence[int] | None = None,
        batch_size: int | None = None,
        memory_budget: int | str | None = None,
        progress: bool = False,
        reuse_prefix: bool = True,
        base_interventions: Sequence[Intervention] = (),
    ):
        self.base_ivs = list(base_interventions)
        if self.base_ivs:  # their positions are absolute: no key/value prefix
            reuse_prefix = False
        self.lm, self.batch, self.target, self.units = lm, batch, target, list(units)
        self.unit_of = list(range(len(self.units))) if unit_of is None else list(unit_of)
        self.n_units = max(self.unit_of) + 1 if self.unit_of else 0
        self.n_prompts, self.n_pos = batch.shape
        self.donors = donors
        self.progress = progress
        self.last_only = bool(getattr(target, "next_token", False))
        self.sites = sorted({u.site for u in self.units})
        layers = sorted({max(u.layer, 0) for u in self.units if u.kind != "embed"})
        self.resid_sites = [f"blocks.{layer}.resid_pre" for layer in layers]
        with torch.no_grad():
            logits, cache = lm.run(
                batch,
                cache=[*self.sites, *self.resid_sites],
                interventions=self.base_ivs,
                last_only=self.last_only,
            )
        self.base_cache = dict(cache)
        #: target on the base run per prompt ``[n_prompts]``, and its mean
        # the target's own precision: float64 models give float64 values
        self.base_values = upcast(target(logits, batch).detach()).cpu()
        self.base_value = self.base_values.mean()
        sizing: dict[str, Any] = dict(
            cap=efficient_rows(lm, self.n_pos),
            batch_size=batch_size,
            memory_budget=memory_budget,
            logit_positions=1 if self.last_only else None,
        )
        self.batch_size = batch_size_for(lm, self.n_pos, **sizing)
        #: rows per forward of the gradient path (``gated`` under autograd)
        self.grad_batch_size = batch_size_for(lm, self.n_pos, grad=True, **sizing)
        self.prefix = prefix_cache(lm, batch) if reuse_prefix and self.last_only else None
        #: the vocabulary columns the target reads (None: all); the masked
        # forwards compute only these logits
        self.logit_columns = target.logit_columns() if hasattr(target, "logit_columns") else None
        self._maps = {s: self._index_map(s) for s in self.sites}
        self.n_forwards = 0

    # ---------------------------------------------------------------- maps
    def _index_map(self, site: str) -> Tensor:
        """``[pos, width]`` (or ``[pos]``) long: unit number + 1 at each
        location of ``site`` (0: not a unit, always kept)."""
        x = self.base_cache[site]  # [n_prompts, pos, ...]
        axis = INDEX_AXES[site.split(".", 2)[-1] if site != "embed" else "embed"]
        shape = (self.n_pos, int(x.shape[2])) if axis is not None else (self.n_pos,)
        m = torch.zeros(shape, dtype=torch.long)
        for j, u in enumerate(self.units):
            if u.site != site:
                continue
            pos = slice(None) if u.position is None else u.position % self.n_pos
            if axis is None or u.index is None:
                m[pos] = self.unit_of[j] + 1
            else:
                m[pos, u.index] = self.unit_of[j] + 1
        return m

    def _donor(self, site: str) -> Tensor:
        d = self.donors.get(site)
        return torch.zeros_like(self.base_cache[site][:1]) if d is None else d

    def _intervention(self, site: str, gate: Tensor, rows_per_prompt: int, p0: int) -> Intervention:
        """Mix actual and donor values of ``site`` for rows ``i * k + j`` with
        ``gate [k, pos, (width)]`` (bool: keep; float: weight of the actual value)."""
        k = rows_per_prompt
        donor = self._donor(site)[:, p0:]
        if donor.shape[0] > 1:
            donor = donor.repeat_interleave(k, 0)  # [n_prompts * k, pos, ...]
        g = gate[:, p0:].repeat(self.n_prompts, *([1] * (gate.dim() - 1)))  # [n_prompts*k, ...]

        def mix(x: Tensor) -> Tensor:
            gx = g.reshape(*g.shape, *([1] * (x.dim() - g.dim())))
            d = donor.to(x.dtype)
            if gx.dtype == torch.bool:
                return torch.where(gx, x, d)
            return gx.to(x.dtype) * x + (1 - gx.to(x.dtype)) * d

        return Intervention(site, mix)

    def _site_gates(self, g_ext: Tensor) -> dict[str, Tensor]:
        """Unit gates ``[k, n + 1]`` (column 0 = 1 / True) -> per-site gates."""
        return {s: g_ext[:, m] for s, m in self._maps.items()}

    # --------------------------------------------------------------- f(keep)
    def _plan(self, keep: Tensor) -> list[tuple[int, int, list[int]]]:
        """Chunks ``(start layer, start position, mask rows)`` of the masks to run."""
        ablated = ~keep  # [m, n_units]
        big = 1 << 30
        layer_of = torch.full((self.n_units,), big, dtype=torch.long)  # earliest per unit
        pos_of = torch.full((self.n_units,), big, dtype=torch.long)
        for u, j in zip(self.units, self.unit_of):
            layer_of[j] = min(int(layer_of[j]), 0 if u.kind == "embed" else u.layer)
            p = 0 if u.position is None else u.position % self.n_pos
            pos_of[j] = min(int(pos_of[j]), p)
        has_pos = all(u.position is not None for u in self.units)
        first_layer = torch.where(ablated, layer_of[None], big).min(1).values  # [m]
        first_pos = torch.where(ablated, pos_of[None], big).min(1).values if has_pos else None
        per_fwd = max(1, self.batch_size // self.n_prompts)
        # rows of the next earliest position join the current forward when the
        # positions they then recompute (rows x gap) cost less than a forward's
        # fixed cost, in tokens of work
        join_tokens = overhead_tokens(self.lm, self.n_pos)
        use_prefix = self.prefix is not None and first_pos is not None
        chunks: list[tuple[int, int, list[int]]] = []
        by_layer: dict[int, list[int]] = {}
        for r in range(keep.shape[0]):
            fl = int(first_layer[r])
            if fl < big:
                by_layer.setdefault(fl, []).append(r)
        embed_first = any(u.kind == "embed" for u in self.units)
        for layer, rows in sorted(by_layer.items()):
            start_layer = (
                -1 if (embed_first and layer == 0 and self._embed_ablated(keep, rows)) else layer
            )
            if not use_prefix:
                for s in range(0, len(rows), per_fwd):
                    chunks.append((start_layer, 0, rows[s : s + per_fwd]))
                continue
            assert first_pos is not None
            groups: dict[int, list[int]] = {}
            for r in rows:
                groups.setdefault(int(first_pos[r]), []).append(r)
            cur: list[int] = []
            p0 = 0
            for p, grp in sorted(groups.items()):
                extra = len(grp) * self.n_prompts * (p - p0)
                if cur and (len(cur) + len(grp) > per_fwd or extra > join_tokens):
                    chunks.append((start_layer, p0, cur))
                    cur = []
                while grp:
                    if not cur:
                        p0 = p
                    take = per_fwd - len(cur)
                    cur, grp = cur + grp[:take], grp[take:]
                    if len(cur) >= per_fwd:
                        chunks.append((start_layer, p0, cur))
                        cur = []
            if cur:
                chunks.append((start_layer, p0, cur))
        return chunks

    def _embed_ablated(self, keep: Tensor, rows: list[int]) -> bool:
        cols = sorted({self.unit_of[j] for j, u in enumerate(self.units) if u.kind == "embed"})
        return bool((~keep[rows][:, cols]).any())

    def values(self, keep: Tensor, per_prompt: bool = False) -> Tensor:
        """Target (mean over prompts) with the units where ``keep [m, n]`` is False
        replaced by their donor values: ``[m]`` (``per_prompt``: ``[m, n_prompts]``)."""
        from tqdm.auto import tqdm

        keep = keep.to(torch.bool)
        out = self.base_values[None].repeat(keep.shape[0], 1)  # [m, n_prompts]
        chunks = self._plan(keep)
        ones = torch.ones(keep.shape[0], 1, dtype=torch.bool)
        site_keep = self._site_gates(torch.cat([ones, keep], 1))
        with torch.no_grad():
            for layer, p0, rows in tqdm(chunks, disable=not self.progress, desc="masked runs"):
                k = len(rows)
                idx = torch.tensor(rows)
                ivs = [
                    self._intervention(s, g[idx], k, p0)
                    for s, g in site_keep.items()
                    if not bool(g[idx].all())
                ]
                out[idx] = self._forward(ivs, k, layer, p0, per_prompt=True).cpu()
        return out if per_prompt else out.mean(1)

    def _forward(
        self,
        ivs: list[Intervention],
        k: int,
        layer: int,
        p0: int,
        grad: bool = False,
        per_prompt: bool = False,
    ) -> Tensor:
        """One batched forward of ``k`` rows per prompt: ``[k]`` (mean over
        prompts) or ``[k, n_prompts]``."""
        vb = self.batch.repeat(k)  # rows prompt-major: row = i * k + j
        kw: dict[str, Any] = {
            "last_only": self.last_only,
            "grad": grad,
            "logit_columns": self.logit_columns,
        }
        run_batch = vb
        if layer > 0:
            kw["start_layer"] = layer
            kw["start_resid"] = self.base_cache[f"blocks.{layer}.resid_pre"].repeat_interleave(k, 0)
        if p0 > 0 and self.prefix is not None and layer >= 0:
            kw["kv_cache"] = _cropped(self.prefix, p0, self.n_pos, k)
            run_batch = Batch(vb.input_ids[:, p0:], vb.attention_mask, vb.position_ids[:, p0:])
            if "start_resid" in kw:
                kw["start_resid"] = kw["start_resid"][:, p0:]
        base_ivs = [_repeat_rows(iv, k) for iv in self.base_ivs]
        logits, _ = self.lm.run(run_batch, interventions=[*base_ivs, *ivs], **kw)
        self.n_forwards += 1
        vals = upcast(self.target(logits, vb)).reshape(self.n_prompts, k)
        return vals.T if per_prompt else vals.mean(0)

    # ------------------------------------------------------------- f_gated(g)
    def gated(self, g: Tensor) -> Tensor:
        """Target (mean over prompts) with each unit at ``g * actual + (1 - g) * donor``:
        ``[m]``, differentiable in ``g`` (forwards start at the earliest unit's layer)."""
        first = min(0 if u.kind == "embed" else u.layer for u in self.units)
        start = -1 if any(u.kind == "embed" for u in self.units) else first
        grad = torch.is_grad_enabled()
        per_fwd = max(1, (self.grad_batch_size if grad else self.batch_size) // self.n_prompts)
        outs = []
        for s in range(0, g.shape[0], per_fwd):
            gc = g[s : s + per_fwd]
            k = gc.shape[0]
            ones = torch.ones(k, 1, dtype=gc.dtype, device=gc.device)
            site_g = self._site_gates(torch.cat([ones, gc], 1))
            ivs = [self._intervention(site, sg, k, 0) for site, sg in site_g.items()]
            outs.append(self._forward(ivs, k, start, 0, grad=grad))
        return torch.cat(outs, 0)


def _repeat_rows(iv: Intervention, k: int) -> Intervention:
    """A base-run intervention with a per-prompt tensor value, for rows ``i * k + j``."""
    v = iv.value
    if isinstance(v, Tensor) and v.dim() > 0 and iv.rows is None and v.shape[0] > 1:
        v = v.repeat_interleave(k, 0)
    return Intervention(iv.site, v, op=iv.op, rows=iv.rows, positions=iv.positions, heads=iv.heads)
