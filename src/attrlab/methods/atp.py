"""Attribution patching: AtP and AtP* (component attribution by gradients).

AtP ("Attribution patching", Nanda 2023; evaluated in Kramár et al., "AtP*: An
efficient and scalable method for localizing LLM behaviour to components",
2024) estimates the effect of patching every unit at once from two forwards
(clean, counterfactual) and one backward:

    effect(i) ~= (a_i(source) - a_i(base)) . d metric / d a_i   at the base run

In the default *noising* direction the base run is the clean prompt and the
source is the counterfactual (the effect of corrupting one unit); with
``direction="denoising"`` the roles swap.

The paper's AtP* adds two fixes for AtP's false negatives:

* **QK fix**: patching a query or key changes attention scores, and the
  softmax can saturate. For query/key units the attention pattern is
  recomputed exactly with the patched query (one row) or key (one column),
  and only the step from the pattern to the metric is linearized:
  ``(pattern' - pattern) . d metric / d pattern``. Under grouped-query
  attention key/value units are key/value heads; a key head's change is
  summed over the query heads that share it.
* **GradDrop**: for every layer ``l`` a backward pass with the gradient through
  layer ``l``'s residual contributions (attention and MLP output) dropped,
  giving ``AtP_l(i)``; the magnitude estimate is
  ``sum_l |AtP_l(i)| / (L - 1)``. All ``L + 1`` backward passes run as one
  batched forward/backward (one group of rows per dropped layer).

attrlab's ``atp*`` adds two exactness fixes, on by default where the model
allows them (``next_attn=False, tail_fix=False`` is the paper's method):

* **Next-layer attention fix** (``next_attn``): for per-position head units,
  the next attention layer's queries, keys, values and softmax are recomputed
  exactly for each unit (see :func:`_next_attn_fix`).
* **Tail fix** (``tail_fix``): the last MLP and the final norm are computed
  exactly along the direction in which the last-position residual changes.

AtP* scores carry the sign of the (QK-fixed) AtP estimate and a magnitude
from GradDrop (``combine="mean"``: the paper's estimate; ``"max"``, the
default: the larger of it and the QK-fixed AtP magnitude, see
:class:`AtPStar`). The plain AtP, QK-fixed and GradDrop estimates are kept
side by side in ``result.extra``.

The **false-negative diagnostic** (``bound_samples > 0``) verifies the top
``bound_top`` units with exact patching, samples ``bound_samples`` of the
others stratified by estimate, patches them exactly, and bounds the number of
unverified units whose true effect exceeds ``theta`` with a one-sided
Clopper-Pearson bound per stratum (level ``delta`` split over strata).

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "When Mary and John went to the store, John gave a drink to",
    ...                  target=(" Mary", " John"), units=al.units.Heads(per_position=True),
    ...                  method="atp*",
    ...                  counterfactual="When Mary and John went to the store, Mary gave a drink to")
    >>> sorted(r.extra)
    ['atp', 'atp_qk', 'atp_tail', 'graddrop', 'graddrop_by_layer']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import CounterfactualWarning, InputError
from ..model.interventions import Intervention
from ..model.wrapper import LM, Batch, Inputs
from ..result import Attribution
from ..targets import KL, Logit, LogitDiff, LogProb, Prob, Target, TopToken
from ..units.base import Units
from ..units.components import AttnOut, Experts, Heads, MlpOut, Neurons, Resid
from .base import Method, check_float, check_int, register

__all__ = [
    "AtPStar",
    "CounterfactualWarning",
    "NodeSet",
    "exact_node_effects",
    "false_negative_bound",
    "layer_ig",
    "verify_units",
]

NODE_KINDS = ("heads", "attn", "mlp", "neurons", "experts", "resid")
HEAD_SITES = ("z", "head_out", "q", "k", "v")


# ---------------------------------------------------------------- node sets
@dataclass
class NodeSet:
    """The sites and unit labels of one node granularity.

    ``site_kind`` is the per-layer site (``attn.z``, ``attn.out`` ...);
    the activation at that site ``[batch, pos, *rest]`` is reduced to unit
    scores ``[pos, *units]`` by :meth:`reduce`.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> ns = NodeSet.build(lm, al.units.Heads(per_position=False), n_pos=3)
        >>> ns.n_units
        8
    """

    kind: str
    site_kind: str
    layers: list[int]
    heads: list[int] | None
    per_position: bool
    n_pos: int
    width: int  # heads, or neurons, or expert slots, or 1

    @classmethod
    def build(cls, lm: LM, units: Units, n_pos: int, head_site: str = "z") -> NodeSet:
        """The node set of ``units`` (heads, attn, mlp, neurons, resid) for ``lm``."""
        cfg = lm.cfg
        if isinstance(units, Heads):
            if head_site not in HEAD_SITES:
                raise InputError(f"head_site must be one of {HEAD_SITES}, got {head_site!r}")
            # key/value units of a grouped-query model are its key/value heads
            heads = units.head_list(cfg.n_kv_heads if head_site in ("k", "v") else cfg.n_heads)
            return cls(
                "heads",
                f"attn.{head_site}",
                units.layer_list(cfg.n_layers),
                heads,
                units.per_position,
                n_pos,
                len(heads),
            )
        if isinstance(units, Experts):  # MoE layers only; every slot (a subset via labels)
            slots = (
                cfg.n_experts if units.site == "router" else cfg.n_experts + cfg.n_shared_experts
            )
            return cls(
                "experts",
                f"mlp.{units.site}",
                units.moe_layers(lm),
                None,
                units.per_position,
                n_pos,
                slots,
            )
        table = {
            AttnOut: ("attn", "attn.out"),
            MlpOut: ("mlp", "mlp.out"),
            Resid: ("resid", "resid_pre"),
            Neurons: ("neurons", "mlp.neurons"),
        }
        for klass, (kind, site) in table.items():
            if type(units) is klass:
                assert isinstance(units, (AttnOut, MlpOut, Resid, Neurons))
                width = cfg.d_mlp if kind == "neurons" else 1
                return cls(
                    kind,
                    site,
                    units.layer_list(cfg.n_layers),
                    None,
                    units.per_position,
                    n_pos,
                    width,
                )
        raise InputError(
            f"attribution patching works on units {', '.join(NODE_KINDS)}; got {units.kind!r}"
        )

    def site(self, layer: int) -> str:
        return f"blocks.{layer}.{self.site_kind}"

    def sites(self) -> list[str]:
        return [self.site(layer) for layer in self.layers]

    @property
    def units_per_layer(self) -> int:
        return self.width * (self.n_pos if self.per_position else 1)

    @property
    def n_units(self) -> int:
        return len(self.layers) * self.units_per_layer

    def reduce(self, prod: Tensor) -> Tensor:
        """``[batch, pos, *rest]`` elementwise products -> ``[units_per_layer]``
        (mean over batch rows; summed over positions unless per position)."""
        if self.kind == "heads":
            x = prod.sum(-1)  # [b, p, H]
            if self.heads is not None:
                x = x[:, :, self.heads]
        elif self.kind == "neurons":
            x = prod  # [b, p, d_mlp]
        elif self.kind == "experts":
            x = prod.sum(-1) if prod.dim() == 4 else prod  # [b, p, slot]
        else:
            x = prod.sum(-1, keepdim=True)  # [b, p, 1]
        x = x.mean(0)  # [p, width]
        if not self.per_position:
            return x.sum(0)
        return x.transpose(0, 1).reshape(-1)  # unit order: width-major, then position

    def unit(self, index: int) -> tuple[int, int | None, int | None]:
        """``(layer, position or None, head/neuron or None)`` of unit ``index``."""
        per_layer = self.units_per_layer
        layer = self.layers[index // per_layer]
        rest = index % per_layer
        npos = self.n_pos if self.per_position else 1
        w, p = divmod(rest, npos)
        pos = p if self.per_position else None
        sub: int | None
        if self.kind == "heads":
            assert self.heads is not None
            sub = self.heads[w]
        elif self.kind in ("neurons", "experts"):
            sub = w
        else:
            sub = None
        return layer, pos, sub


# ------------------------------------------------------------- run helpers
_LAST_ONLY_TARGETS = (Logit, LogProb, Prob, LogitDiff, KL, TopToken)


def uses_last_only(target: Target) -> bool:
    """True when ``target`` reads the last position only (logits can be cut)."""
    return isinstance(target, _LAST_ONLY_TARGETS) and target.next_token


def prepare_pair(
    lm: LM, inputs: Inputs, target: Target, counterfactual: Inputs | None
) -> tuple[Batch, Batch]:
    """Tokenize and prepare the clean and counterfactual batches (same shape).

    Raises:
        InputError: no counterfactual given.
        CounterfactualLengthError: the counterfactual tokenizes differently.
    """
    if counterfactual is None:
        raise InputError(
            "attribution patching compares two runs: pass counterfactual= (a corrupted "
            "prompt of the same token length)"
        )
    batch = target.prepare(lm, lm.tokenize(inputs))
    cf = lm.tokenize(counterfactual)
    if cf.shape[0] == 1 and batch.shape[0] > 1:
        cf = cf.repeat(batch.shape[0])
    cf = target.prepare(lm, cf)
    lm.check_counterfactual(batch, cf)
    return batch, cf


def same_batch(a: Batch, b: Batch) -> bool:
    """The two batches hold the same tokens (so every activation is the same)."""
    return (
        a.input_ids.shape == b.input_ids.shape
        and torch.equal(a.input_ids, b.input_ids)
        and torch.equal(a.attention_mask, b.attention_mask)
    )


def warn_if_same(m_clean: float, m_cf: float, what: str = "scores") -> bool:
    """Warn (:class:`CounterfactualWarning`) when the counterfactual leaves the
    metric unchanged; returns True in that case."""
    if abs(m_clean - m_cf) <= 1e-6 * max(1.0, abs(m_clean)):
        warnings.warn(
            f"the counterfactual does not change the target (clean {m_clean:.6g} == "
            f"counterfactual {m_cf:.6g}): every effect is zero and normalized {what} are "
            "undefined. Use a counterfactual that changes the answer (e.g. swap the names).",
            CounterfactualWarning,
            stacklevel=3,
        )
        return True
    return False


def _metric(lm: LM, target: Target, batch: Batch, **kw: Any) -> tuple[Tensor, Any]:
    logits, cache = lm.run(batch, last_only=uses_last_only(target), **kw)
    return target(logits, batch), cache


# -------------------------------------------------------------- exact oracle
def exact_node_effects(
    lm: LM,
    base: Batch,
    source_cache: dict[str, Tensor],
    target: Target,
    nodes: NodeSet,
    indices: Sequence[int] | None = None,
    chunk: int = 64,
    progress: bool = False,
) -> Tensor:
    """Exact activation patching of single units: ``mean_b[metric(base with unit
    i set to its source value) - metric(base)]`` for each unit in ``indices``.

    ``source_cache`` holds the source run's activations at ``nodes.sites()``.
    Many units run in one batched forward (``chunk`` units per forward).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> t = al.targets.resolve(" Mary", lm)
        >>> b, cf = lm.tokenize("a b c"), lm.tokenize("a c c")
        >>> ns = NodeSet.build(lm, al.units.MlpOut(), n_pos=3)
        >>> _, src = lm.run(cf, cache=ns.sites())
        >>> exact_node_effects(lm, b, src, t, ns).shape
        torch.Size([2])
    """
    from tqdm.auto import tqdm

    idx = list(range(nodes.n_units)) if indices is None else list(indices)
    n_b = base.shape[0]
    with torch.no_grad():
        m0 = target(lm.run(base, last_only=uses_last_only(target))[0], base).double()
    out = torch.zeros(len(idx), dtype=torch.float64)
    chunk = max(1, chunk // n_b) if n_b > 1 else chunk
    for start in tqdm(range(0, len(idx), chunk), disable=not progress, desc="exact patching"):
        part = idx[start : start + chunk]
        rows = base.repeat(len(part))  # prompt-major: row b * len(part) + u
        by_site: dict[str, list[tuple[int, int | None, int | None]]] = {}
        for u, i in enumerate(part):
            layer, pos, sub = nodes.unit(i)
            by_site.setdefault(nodes.site(layer), []).append((u, pos, sub))
        ivs = []
        for site, entries in by_site.items():
            src = source_cache[site]
            mask = torch.zeros((len(part) * n_b, *src.shape[1:]), dtype=torch.bool)
            for u, pos, sub in entries:
                sel: list[Any] = [slice(u, None, len(part))]
                sel.append(slice(None) if pos is None else pos)
                if sub is not None:
                    sel.append(sub)
                mask[tuple(sel)] = True
            src_rows = src.repeat_interleave(len(part), 0)

            def patch(x: Tensor, mask: Tensor = mask, src_rows: Tensor = src_rows) -> Tensor:
                return torch.where(mask.to(x.device), src_rows.to(x.device, x.dtype), x)

            ivs.append(Intervention(site, patch))
        with torch.no_grad():
            logits, _ = lm.run(rows, interventions=ivs, last_only=uses_last_only(target))
            m = target(logits, rows).double().reshape(n_b, len(part))
        out[start : start + len(part)] = (m - m0[:, None]).mean(0)
    return out


# ------------------------------------------------------------------ QK fix
def _score_masks(base: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """Which attention scores of ``base`` exist: causal ``allowed [q, k]``, real
    (not padding) keys ``key_ok [b, k]``, and both together ``[b, 1, q, k]``."""
    n_pos = base.shape[1]
    allowed = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    key_ok = base.attention_mask.bool()
    return allowed, key_ok, allowed[None, None] & key_ok[:, None, None, :]


def _qk_fix(
    lm: LM,
    nodes: NodeSet,
    base: Batch,
    base_cache: dict[str, Tensor],
    src_cache: dict[str, Tensor],
    grad_pattern: dict[int, Tensor],
) -> Tensor:
    """Per-unit effects of query or key units with the softmax recomputed."""
    comp = nodes.site_kind.split(".")[1]  # "q" or "k"
    scores = []
    _, _, mask = _score_masks(base)  # [b, 1, q, k]
    pos_ids = base.position_ids

    def qk(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        # the family's rotary embedding (none for plain q.k) and shared key heads
        return lm.scores_qk(q.double(), k.double(), pos_ids)

    for layer in nodes.layers:
        scale = lm.attn_scale(layer)
        q_site, k_site = f"blocks.{layer}.attn.q", f"blocks.{layer}.attn.k"
        q, k = qk(base_cache[q_site], base_cache[k_site])  # [b, p, h, dh]
        p = base_cache[f"blocks.{layer}.attn.pattern"].double()  # [b, h, q, k]
        g = grad_pattern[layer].double()  # [b, h, q, k]
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        s = s.masked_fill(~mask, float("-inf"))
        if comp == "q":
            q2, _ = qk(src_cache[q_site], base_cache[k_site])
            s2 = torch.einsum("bqhd,bkhd->bhqk", q2, k) * scale
            s2 = s2.masked_fill(~mask, float("-inf"))
            if nodes.per_position:
                # row i uses the patched query i; other rows unchanged
                p2 = s2.softmax(-1).nan_to_num(0.0)
                eff = ((p2 - p) * g).sum(-1)  # [b, h, q]
            else:
                p2 = s2.softmax(-1).nan_to_num(0.0)
                eff = ((p2 - p) * g).sum((-1, -2))[:, :, None]  # [b, h, 1]
        else:
            _, k2 = qk(base_cache[q_site], src_cache[k_site])
            if nodes.per_position:
                # column j uses the patched key j: closed-form renormalization per row
                d = torch.einsum("bqhd,bkhd->bhqk", q, k2 - k) * scale  # dS[i, j]
                d = d.masked_fill(~mask, 0.0).clamp(max=80.0)
                r = 1.0 + p * torch.expm1(d)  # Z'/Z  [b, h, q, j]
                pg = (p * g).sum(-1, keepdim=True)  # [b, h, q, 1]
                term = (1.0 / r - 1.0) * pg + p * g * torch.expm1(d) / r
                eff = term.masked_fill(~mask, 0.0).sum(2)  # sum over queries -> [b, h, j]
            else:
                s2 = torch.einsum("bqhd,bkhd->bhqk", q, k2) * scale
                s2 = s2.masked_fill(~mask, float("-inf"))
                p2 = s2.softmax(-1).nan_to_num(0.0)
                eff = ((p2 - p) * g).sum((-1, -2))[:, :, None]
        eff = eff.mean(0)  # [h, pos or 1]
        if comp == "k" and k.shape[2] != base_cache[k_site].shape[2]:
            # a shared key head changes the pattern of every query head of its group
            eff = eff.reshape(base_cache[k_site].shape[2], -1, eff.shape[-1]).sum(1)
        assert nodes.heads is not None
        scores.append(eff[nodes.heads].reshape(-1))
    return torch.cat(scores).float()


# ------------------------------------------------ next-layer attention fix
NEXT_ATTN_SITES = ("z", "head_out")


def _next_attn_fix(
    lm: LM,
    nodes: NodeSet,
    base: Batch,
    base_cache: dict[str, Tensor],
    src_cache: dict[str, Tensor],
    cotangents: Sequence[dict[int, Tensor]],
) -> list[Tensor]:
    """Exact next attention layer for per-position head units (``next_attn``).

    A head unit at layer ``l``, position ``p`` (site ``z`` or ``head_out``)
    changes the residual stream at ``p`` only, by ``dr`` (its change through
    the output projection). Up to the next attention layer ``l + 1`` the
    stream at ``p`` passes position-wise modules only (block ``l``'s MLP and
    block ``l + 1``'s pre-attention norm), so the query (row ``p``), key and
    value (column ``p``) of every head of layer ``l + 1`` after patching are
    computed exactly with the model's own modules (no architecture code
    here; one batched pass over ``batch x pos x heads`` rows), and so is the
    change of that layer's head outputs ``z`` at every query position: row
    ``p`` by a full softmax, later rows by closed-form renormalization of
    column ``p``, including the pattern x value cross term. Scores go through
    the wrapper's ``scores_qk`` (the family's rotary embedding, shared key
    heads; rotary is linear, so a change of q or k at position ``p`` is rotated
    at ``p``), and shared value heads are repeated for their query heads. For each
    cotangent ``g`` on ``z`` of layer ``l + 1`` a unit gets
    ``g . dz(exact) - dr . w_p``, where ``w_p`` is the gradient of
    ``g . z`` (through the same modules and the softmax) with respect to the
    residual at ``p``: one small backward per layer over positions, not per
    unit. This turns AtP's first-order term for the next attention layer into
    the exact one; everything after that layer stays first order.

    Returns one ``[batch, n_units]`` tensor per cotangent (zero for units of
    the last layer, which feed no later attention).
    """
    cfg = lm.cfg
    n_b, n_pos = base.shape
    comp = nodes.site_kind.split(".")[1]
    assert nodes.heads is not None and nodes.per_position
    hs = nodes.heads
    allowed, key_ok, valid = _score_masks(base)  # [q, k], [b, k], [b, 1, q, k]
    pos_ids = base.position_ids

    def rot(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        # [b, p, heads, dh] / [b, p, kv_heads, dh] -> score-ready q, k (both [.., heads, dh])
        return lm.scores_qk(q, k, pos_ids)

    def share(v: Tensor, dim: int) -> Tensor:
        # value heads shared by several query heads, repeated for each of them
        n_rep = cfg.n_heads // v.shape[dim]
        return v.repeat_interleave(n_rep, dim=dim) if n_rep > 1 else v

    outs: list[list[Tensor]] = [[] for _ in cotangents]
    for layer in nodes.layers:
        nxt = layer + 1
        if nxt >= cfg.n_layers:
            for o in outs:
                o.append(torch.zeros(n_b, n_pos, len(hs), dtype=torch.float64))
            continue
        site = nodes.site(layer)
        delta = (src_cache[site] - base_cache[site])[:, :, hs]  # [b, p, hu, *]
        if comp == "z":
            w_o = lm.W_O(layer)[hs].to(delta.dtype)  # [hu, dh, d]
            dr = torch.einsum("bphe,hed->bphd", delta, w_o)  # [b, p, hu, d]
        else:
            dr = delta
        x = base_cache[f"blocks.{layer}.resid_mid"].detach()  # [b, p, d]
        shape = dr.shape
        x_u = x[:, :, None].expand(shape).reshape(-1, shape[-1]).contiguous()
        dr_u = dr.reshape(-1, shape[-1]).to(x.dtype).contiguous()
        scale = lm.attn_scale(nxt)
        # first order: w_p = d (g . z) / d resid_mid[p], one backward over positions
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            q0, k0, v0 = lm.next_layer_qkv(layer, xg)  # [b, p, j(kv), dh]
            q0r, k0r = rot(q0, k0)  # [b, p, j, dh]
            s0 = torch.einsum("bqje,bkje->bjqk", q0r, k0r) * scale
            s0 = s0.masked_fill(~valid, torch.finfo(s0.dtype).min)
            z0 = torch.einsum("bjqk,bkje->bqje", s0.softmax(-1), share(v0, 2))  # [b, q, j, dh]
            w = [
                torch.autograd.grad(
                    (z0 * cot[nxt].to(z0.dtype)).sum(), xg, retain_graph=i < len(cotangents) - 1
                )[0].double()
                for i, cot in enumerate(cotangents)
            ]  # [b, p, d] each
        with torch.no_grad():
            q1, k1, v1 = lm.next_layer_qkv(layer, x_u + dr_u)  # [b * p * hu, j(kv), dh]
        ush = (n_b, n_pos, len(hs), -1, cfg.d_head)  # [b, p, hu, j(kv), dh]
        q0, k0, v0 = (t.detach().double()[:, :, None] for t in (q0, k0, v0))
        dq_ex = q1.double().reshape(ush) - q0
        dk_ex = k1.double().reshape(ush) - k0
        dv_ex = share(v1.double().reshape(ush) - v0, 3)  # [b, p, hu, j, dh]
        # each unit's change of q / k sits at its own position p: rotate it there
        flat = (n_b, n_pos, -1, cfg.d_head)  # [b, p, hu * j(kv), dh]
        dq_r, dk_r = rot(dq_ex.reshape(flat), dk_ex.reshape(flat))
        shape_h = (n_b, n_pos, len(hs), cfg.n_heads, cfg.d_head)  # [b, p, hu, j, dh]
        dq_ex, dk_ex = dq_r.reshape(shape_h), dk_r.reshape(shape_h)
        qb, kb = rot(
            base_cache[f"blocks.{nxt}.attn.q"].double(), base_cache[f"blocks.{nxt}.attn.k"].double()
        )  # [b, p, j, dh]
        vb = share(base_cache[f"blocks.{nxt}.attn.v"].double(), 2)
        pat = base_cache[f"blocks.{nxt}.attn.pattern"].double()  # [b, j, q, k]
        # row p (query p): scores against every key, key p patched too
        q_new = qb[:, :, None] + dq_ex  # [b, p, hu, j, dh]
        k_new_p = kb[:, :, None] + dk_ex
        s_row = torch.einsum("bphje,bkje->bphjk", q_new, kb) * scale
        eye = torch.eye(n_pos, dtype=torch.bool)[None, :, None, None, :]  # [1, p, 1, 1, k]
        s_diag = (q_new * k_new_p).sum(-1, keepdim=True) * scale  # [b, p, hu, j, 1]
        s_row = torch.where(eye, s_diag, s_row)
        row_ok = valid[:, 0][:, :, None, None, :]  # [b, p, 1, 1, k]
        p_row_new = s_row.masked_fill(~row_ok, float("-inf")).softmax(-1).nan_to_num(0.0)
        p_row = pat.permute(0, 2, 1, 3)[:, :, None]  # [b, p, 1, j, k]
        pp_new = torch.where(eye, p_row_new, torch.zeros_like(p_row_new)).sum(-1)  # [b,p,hu,j]
        # later rows q > p: column p renormalized (closed form)
        d_col = torch.einsum("bqje,bphje->bphjq", qb, dk_ex) * scale  # [b, p, hu, j, q]
        later = ~allowed  # [p, q]: q > p
        col_ok = later[None, :, None, None, :] & key_ok[:, :, None, None, None]
        p_col = pat.permute(0, 3, 1, 2)[:, :, None]  # [b, p(key), 1, j, q]
        d_col = d_col.masked_fill(~col_ok, 0.0).clamp(max=80.0)
        em = torch.expm1(d_col)
        r = 1.0 + p_col * em
        for ci, cot in enumerate(cotangents):
            gz = cot[nxt].double()  # d metric / d z of layer l + 1: [b, q, j, dh]
            g = torch.einsum("bqje,bkje->bjqk", gz, vb)  # d metric / d pattern
            pg = (pat * g).sum(-1)  # [b, j, q]  (= g . z)
            g_row = g.permute(0, 2, 1, 3)[:, :, None]  # [b, p, 1, j, k]
            gdv_row = torch.einsum("bpje,bphje->bphj", gz, dv_ex)  # g_p . dv_p
            ex_row = ((p_row_new - p_row) * g_row).sum(-1) + pp_new * gdv_row  # [b, p, hu, j]
            g_col = g.permute(0, 3, 1, 2)[:, :, None]  # [b, p(key), 1, j, q]
            pg_col = pg[:, None, None]  # [b, 1, 1, j, q]
            gdv_col = torch.einsum("bqje,bphje->bphjq", gz, dv_ex)  # g_q . dv_p
            ex_col = (1.0 / r - 1.0) * pg_col + p_col * (g_col * em + gdv_col * (1 + em)) / r
            col = ex_col.masked_fill(~col_ok, 0.0).sum(-1)  # [b, p, hu, j]
            lin = torch.einsum("bphd,bpd->bph", dr.double(), w[ci])
            outs[ci].append((ex_row + col).sum(-1) - lin)  # [b, p, hu]
    res = []
    for o in outs:
        x_all = torch.stack(o, 1)  # [b, layer, p, hu]
        # unit order: layer, then head, then position
        res.append(x_all.permute(0, 1, 3, 2).reshape(n_b, -1))
    return res


# ------------------------------------------------------------ core routine
def _attribution_patching(
    lm: LM,
    inputs: Inputs,
    target: Target,
    units: Units,
    counterfactual: Inputs | None,
    *,
    direction: str,
    head_site: str,
    star: bool,
    graddrop: bool,
    qk_fix: bool,
    combine: str = "max",
    ig_steps: int = 0,
    tail_fix: bool = False,
    tail_points: int = 16,
    next_attn: bool = False,
) -> tuple[NodeSet, dict[str, Tensor], dict[str, Any], Batch, Batch]:
    if direction not in ("noising", "denoising"):
        raise InputError(f"direction must be 'noising' or 'denoising', got {direction!r}")
    clean, cf = prepare_pair(lm, inputs, target, counterfactual)
    base, src = (clean, cf) if direction == "noising" else (cf, clean)
    nodes = NodeSet.build(lm, units, n_pos=clean.shape[1], head_site=head_site)
    sites = nodes.sites()
    comp = nodes.site_kind.split(".")[-1]
    use_qk = star and qk_fix and nodes.kind == "heads" and comp in ("q", "k")
    diagnostics: dict[str, Any] = {"direction": direction}
    if use_qk and not lm.qk_scores_exact(clean.shape[1]):
        # the scores are not attn.scaling * q'.k' of the cached sites (softcapping,
        # partial rotary, a sliding window shorter than the prompt, ...)
        use_qk = False
        diagnostics["qk_fix"] = (
            f"unavailable for family {lm.cfg.family!r} (its attention scores cannot be "
            "recomputed from the q/k sites); linear AtP used"
        )
    n_layers_all = lm.cfg.n_layers
    last = n_layers_all - 1
    tail_sites = [f"blocks.{last}.resid_pre", f"blocks.{last}.attn.out"]
    use_tail = star and tail_fix
    if use_tail and (lm.cfg.parallel_residual or not uses_last_only(target)):
        use_tail = False
        diagnostics["tail_fix"] = (
            "unavailable: needs a sequential-residual model and a target read at the last "
            "position; AtP* without it"
        )
    use_na = star and next_attn
    if use_na and not (nodes.kind == "heads" and comp in NEXT_ATTN_SITES and nodes.per_position):
        use_na = False
        diagnostics["next_attn"] = (
            "applies to per-position head units at sites 'z' / 'head_out' only; off"
        )
    if use_na and (
        lm.cfg.parallel_residual or lm.cfg.post_block_norms or not lm.qk_scores_exact(base.shape[1])
    ):
        use_na = False
        diagnostics["next_attn"] = (
            f"unavailable for family {lm.cfg.family!r} (needs sequential blocks without "
            "post-block norms, and attention scores the wrapper can recompute: plain q.k "
            "or rotary through scores_qk); off"
        )
    na_next = sorted({ly + 1 for ly in nodes.layers if ly + 1 < n_layers_all}) if use_na else []
    extra_sites: list[str] = []
    for nxt in na_next:
        extra_sites += [f"blocks.{nxt - 1}.resid_mid"]
        extra_sites += [f"blocks.{nxt}.attn.{c}" for c in ("q", "k", "v", "pattern", "z")]
    if use_qk:
        for layer in nodes.layers:
            extra_sites += [f"blocks.{layer}.attn.{c}" for c in ("q", "k", "pattern")]
    if use_tail:
        extra_sites += tail_sites
    extra_sites = list(dict.fromkeys(s for s in extra_sites if s not in sites))

    # source run (no grad); a source identical to the base is read off the base
    # run below, so every activation difference is exactly zero, not rounding
    # noise from a second forward of another batch shape
    same_inputs = same_batch(base, src)
    if not same_inputs:
        with torch.no_grad():
            m_src, src_cache = _metric(lm, target, src, cache=sites + extra_sites)
    n_b = base.shape[0]
    n_layers = lm.cfg.n_layers
    groups = n_layers + 1 if (star and graddrop and n_layers > 1) else 1
    # one more row group (the plain base run) carries the tail fix's projection
    stride = groups + 1 if use_tail else groups
    run_batch = base.repeat(stride) if stride > 1 else base  # row b * stride + g
    ivs = []
    if groups > 1:
        for layer in range(n_layers):
            rows = [b * stride + layer + 1 for b in range(n_b)]
            for kind in ("attn.out", "mlp.out"):
                ivs.append(Intervention(f"blocks.{layer}.{kind}", _detach, rows=rows))
    m_all, cache = _metric(
        lm, target, run_batch, cache=sites + extra_sites, interventions=ivs, grad=True
    )
    if m_all.dim() != 1:
        raise InputError("attribution patching needs a target with one value per prompt")
    if same_inputs:
        m_src = m_all[::stride].detach()
        src_cache = {s: cache[s][::stride].detach() for s in sites + extra_sites}
    loss = m_all.reshape(n_b, stride)[:, :groups].sum() / n_b
    wrt = [cache[s] for s in sites]
    pat_sites = [f"blocks.{layer}.attn.pattern" for layer in nodes.layers] if use_qk else []
    wrt += [cache[s] for s in pat_sites]
    n_main = len(wrt)
    wrt += [cache[f"blocks.{nxt}.attn.z"] for nxt in na_next]
    if use_tail:
        pre, aout = tail_sites
        x_graph = cache[pre][groups::stride, -1] + cache[aout][groups::stride, -1]  # [b, d]
        x0 = x_graph.detach()
        x1 = (src_cache[pre][:, -1] + src_cache[aout][:, -1]).to(x0.dtype)
        u = (x1 - x0) / (x1 - x0).norm(dim=-1, keepdim=True).clamp_min(1e-12)
        loss = loss + (x_graph * u).sum()  # its gradient lands in the last row group only
        wrt.append(cache[aout])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    g_na = grads[n_main : n_main + len(na_next)]
    na_corr: list[Tensor] = []
    if use_na:
        base_c = {s: cache[s][::stride].detach() for s in sites + extra_sites}

        def cot(gi: int) -> dict[int, Tensor]:
            return {
                nxt: torch.zeros_like(base_c[f"blocks.{nxt}.attn.z"])
                if g is None
                else g[gi::stride].detach() * n_b
                for nxt, g in zip(na_next, g_na)
            }

        cots = [cot(0)] + ([cot(groups)] if use_tail else [])
        na_corr = _next_attn_fix(lm, nodes, base, base_c, src_cache, cots)
        diagnostics["next_attn"] = f"exact attention patterns of layers {na_next}"
    kappa: Tensor | None = None
    if use_tail:
        g_out = grads[-1]
        grads = grads[:-1]
        slope = (
            torch.zeros(n_b, dtype=torch.float64)
            if g_out is None
            else (g_out[::stride, -1].double() * n_b * u.double()).sum(-1)
        )  # dF_b/du at x0
        proj = [None if g is None else g[groups::stride].detach() for g in grads[: len(sites)]]
        kappa = _tail_correction(
            lm,
            target,
            nodes,
            base,
            {s: cache[s][::stride].detach() for s in sites},
            src_cache,
            proj,
            x0,
            u,
            slope,
            tail_points,
            na_corr[1] / n_b if use_na else None,
            cache[pre][groups::stride].detach(),
        )
        diagnostics["tail_fix"] = f"final MLP/norm at the last position, {tail_points} points"
    m_base = m_all[::stride].detach().float()
    diagnostics["metric_base"] = float(m_base.mean())
    diagnostics["metric_source"] = float(m_src.float().mean())
    same = warn_if_same(float(m_base.mean()), float(m_src.float().mean()))
    diagnostics["counterfactual_changes_target"] = not same

    base_cache = {s: cache[s][::stride].detach() for s in sites + extra_sites}

    def atp_for_group(gi: int, linear: bool) -> Tensor:
        if not linear and use_qk:
            gpat = {
                layer: grads[len(sites) + i][gi::stride].detach() * n_b
                for i, layer in enumerate(nodes.layers)
            }
            return _qk_fix(lm, nodes, base, base_cache, src_cache, gpat)
        parts = []
        for s, gr in zip(sites, grads[: len(sites)]):
            a_base = base_cache[s]
            gsl = torch.zeros_like(a_base) if gr is None else gr[gi::stride].detach() * n_b
            delta = src_cache[s].to(a_base.dtype) - a_base
            parts.append(nodes.reduce((delta * gsl).float()))
        return torch.cat(parts)

    out: dict[str, Tensor] = {"atp": atp_for_group(0, linear=True)}
    if star:
        out["atp_qk"] = atp_for_group(0, linear=False) if use_qk else out["atp"].clone()
        if groups > 1:
            drops = torch.stack([atp_for_group(g, linear=False) for g in range(1, groups)])
            gd = drops.abs().sum(0) / (n_layers - 1)  # [units]
            out["graddrop_by_layer"] = drops
        if use_na:
            out["atp_qk"] = out["atp_qk"] + na_corr[0].mean(0).float()
        first = out["atp_qk"]
        if kappa is not None:
            first = out["atp_tail"] = out["atp_qk"] + kappa
        if groups == 1:
            gd = first.abs()
        out["graddrop"] = gd
        sign = torch.sign(first)
        sign[sign == 0] = 1.0
        mag = gd if combine == "mean" else torch.maximum(gd, first.abs())
        if ig_steps > 0:
            ig = layer_ig(lm, target, nodes, base, base_cache, src_cache, ig_steps)
            out["ig"] = ig
            sign = torch.sign(ig)
            sign[sign == 0] = 1.0
            mag = torch.maximum(mag, ig.abs())
            diagnostics["ig_steps"] = ig_steps
        out["atp*"] = sign * mag
    return nodes, out, diagnostics, base, src


def _tail_correction(
    lm: LM,
    target: Target,
    nodes: NodeSet,
    base: Batch,
    base_cache: dict[str, Tensor],
    src_cache: dict[str, Tensor],
    proj_grads: Sequence[Tensor | None],
    x0: Tensor,
    u: Tensor,
    slope: Tensor,
    n_points: int,
    c_extra: Tensor | None = None,
    resid_pre: Tensor | None = None,
) -> Tensor:
    """Non-linear remainder of the final MLP / norm along the direction of change.

    ``x`` is the residual at the last position after the last attention layer
    (``resid_mid`` of the last block, ``x0``: ``[b, d_model]``); everything the
    target reads downstream of it is a function ``F_b(x)`` of that one vector
    (last MLP, final norm, unembedding). With ``u`` the unit direction of
    ``x(source) - x(base)``, a unit's linearized change of ``x`` is split into
    ``c_i u`` plus a remainder; ``c_i = delta_i . proj_grads`` (the gradient of
    ``x . u``, one more row group of the main backward). ``F_b`` is evaluated
    exactly on a grid of ``c`` values (one no-grad batched forward that sets
    ``x``), and the unit gets ``F_b(x0 + c_i u) - F_b(x0) - c_i slope_b`` added
    to its first-order estimate (``slope_b = dF_b/du`` at ``x0``): exact along
    ``u``, first order in the remainder.
    ``c_extra`` (``[b, units]``) is added to ``c`` (the exact-pattern part of
    the projection from ``next_attn``); with ``resid_pre`` (the base residual
    entering the last block, ``[b, pos, d_model]``) the grid forward runs the
    last block only.

    Returns ``[n_units]`` (mean over prompts).
    """
    last = lm.cfg.n_layers - 1
    n_b, n_pos = base.shape
    cols = []
    for s, g in zip(nodes.sites(), proj_grads):
        a_base = base_cache[s]
        delta = src_cache[s].to(a_base.dtype) - a_base
        prod = (delta * (torch.zeros_like(a_base) if g is None else g)).float()
        cols.append(torch.stack([nodes.reduce(prod[b : b + 1]) for b in range(n_b)]))
    c = torch.cat(cols, 1).double()  # [b, units]
    if c_extra is not None:  # next_attn: exact next-attention part of the projection
        c = c + c_extra.double()
    k = max(2, n_points // 2 + 1)
    lo = torch.minimum(c.min(1).values, torch.zeros(n_b, dtype=c.dtype))
    hi = torch.maximum(c.max(1).values, torch.zeros(n_b, dtype=c.dtype))
    steps = torch.linspace(0, 1, k, dtype=c.dtype)
    grid = torch.cat([lo[:, None] * (1 - steps), hi[:, None] * steps[1:]], 1)  # [b, 2k-1]
    n_g = grid.shape[1]
    zero = k - 1  # grid[:, zero] == 0
    vals = x0[:, None, :] + grid[:, :, None].to(x0.dtype) * u[:, None, :]  # [b, G, d]
    rows = base.repeat(n_g)  # prompt-major: row b * n_g + g
    iv = Intervention(
        f"blocks.{last}.resid_mid", vals.reshape(n_b * n_g, 1, -1), positions=[n_pos - 1]
    )
    # with the base residual entering the last block, only that block runs
    start_resid = None if resid_pre is None else resid_pre.repeat_interleave(n_g, 0)
    with torch.no_grad():
        logits, _ = lm.run(
            rows,
            interventions=[iv],
            last_only=True,
            start_layer=None if start_resid is None else last,
            start_resid=start_resid,
        )
        f = target(logits, rows).double().reshape(n_b, n_g)
    # piecewise-linear interpolation of F_b at c[b, i] (grid is sorted per prompt)
    idx = torch.searchsorted(grid.contiguous(), c.contiguous()).clamp(1, n_g - 1)
    g0, g1 = grid.gather(1, idx - 1), grid.gather(1, idx)
    f0, f1 = f.gather(1, idx - 1), f.gather(1, idx)
    w = ((c - g0) / (g1 - g0).clamp_min(1e-30)).clamp(0, 1)
    f_c = f0 + w * (f1 - f0)
    kappa = f_c - f[:, zero : zero + 1] - c * slope[:, None]
    return kappa.mean(0).float()


def layer_ig(
    lm: LM,
    target: Target,
    nodes: NodeSet,
    base: Batch,
    base_cache: dict[str, Tensor],
    src_cache: dict[str, Tensor],
    steps: int,
) -> Tensor:
    """Per-layer integrated gradients along the patch path (midpoint rule).

    For every layer ``l`` of ``nodes`` and ``alpha_k = (k + 1/2) / steps``, one
    group of batch rows runs the base prompt with *all* of layer ``l``'s units
    shifted by ``alpha_k * (a(source) - a(base))`` (everything else free); the
    unit score is ``delta . mean_k d metric / d a`` at those points. Unlike
    AtP (gradient at ``alpha = 0`` only), the gradient is taken part of the way
    toward the patched state, past a saturated MLP / LayerNorm downstream of the
    unit. All ``len(layers) * steps`` groups run as one batched forward and
    backward. The path moves a whole layer at once (not one unit), so this is
    not the single-unit integral; see ``docs/circuits.md`` for its accuracy.

    Returns ``[n_units]`` scores in the node set's unit order.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> t = al.targets.resolve(" a", lm)
        >>> b, cf = lm.tokenize("a b c"), lm.tokenize("a c c")
        >>> ns = NodeSet.build(lm, al.units.MlpOut(), n_pos=3)
        >>> _, src = lm.run(cf, cache=ns.sites())
        >>> _, bc = lm.run(b, cache=ns.sites())
        >>> layer_ig(lm, t, ns, b, bc, src, steps=2).shape
        torch.Size([2])
    """
    if steps < 1:
        raise InputError(f"ig_steps must be >= 1, got {steps}")
    sites = nodes.sites()
    n_b = base.shape[0]
    n_groups = len(sites) * steps
    rows = base.repeat(n_groups)  # prompt-major: row b * n_groups + g, g = site * steps + k
    ivs = []
    deltas = {}
    for si, s in enumerate(sites):
        a_base = base_cache[s]
        delta = src_cache[s].to(a_base.dtype) - a_base  # [b, p, *rest]
        deltas[s] = delta
        shift = torch.zeros((n_b, n_groups, *delta.shape[1:]), dtype=delta.dtype)
        for k in range(steps):
            shift[:, si * steps + k] = (k + 0.5) / steps * delta
        shift = shift.reshape(n_b * n_groups, *delta.shape[1:])

        def add(x: Tensor, shift: Tensor = shift) -> Tensor:
            return x + shift.to(x.device, x.dtype)

        ivs.append(Intervention(s, add))
    m, cache = _metric(lm, target, rows, cache=sites, interventions=ivs, grad=True)
    grads = torch.autograd.grad(m.sum() / n_b, [cache[s] for s in sites], allow_unused=True)
    parts = []
    for si, (s, gr) in enumerate(zip(sites, grads)):
        delta = deltas[s]
        if gr is None:
            parts.append(nodes.reduce(torch.zeros_like(delta).float()))
            continue
        g = sum(gr[si * steps + k :: n_groups].detach() for k in range(steps)) * (n_b / steps)
        parts.append(nodes.reduce((delta * g).float()))
    return torch.cat(parts)


def _detach(x: Tensor) -> Tensor:
    return x.detach()


#: extras that hold per-unit effect estimates (flipped to contributions with the scores)
_EFFECT_EXTRAS = ("atp", "atp_qk", "graddrop_by_layer", "ig", "atp_tail", "atp*")


def _unit_order(lm: LM, nodes: NodeSet, units: Units) -> tuple[list[int], list[dict[str, Any]]]:
    """The node index of each unit of ``units`` in the kind's one labelling order
    (:func:`attrlab.units.components.locations`, which also applies a neuron
    subset) and the units' labels."""
    from ..units.components import locations

    _, _, labels = locations(lm, units, nodes.n_pos, nodes.site_kind.split(".")[-1])
    index = {nodes.unit(i): i for i in range(nodes.n_units)}
    order = []
    for lab in labels:
        sub = lab.get("head", lab.get("kv_head", lab.get("neuron", lab.get("expert"))))
        key = (lab["layer"], lab.get("position"), sub)
        if key not in index:
            raise InputError(f"unit {lab} is not among the attributed nodes")
        order.append(index[key])
    return order, labels


def _result(
    lm: LM,
    nodes: NodeSet,
    scores: Tensor,
    method: Method,
    target: Target,
    diagnostics: dict[str, Any],
    extra: dict[str, Tensor],
    base: Batch,
    units: Units,
) -> Attribution:
    meta: dict[str, Any] = {"direction": diagnostics.get("direction", "noising")}
    if lm.tokenizer is not None and base.shape[0] == 1:
        meta["tokens"] = lm.to_str_tokens(base.input_ids[0])
    if meta["direction"] == "noising":
        # one sign: contributions (f(all) - f(all without u)); the estimates above
        # are effects of patching (patched - clean): r.effect_of_patching()
        scores = -scores
        extra = {k: (-v if k in _EFFECT_EXTRAS else v) for k, v in extra.items()}
    from ..units.components import label_columns

    order, labels = _unit_order(lm, nodes, units)
    cols = label_columns(labels, meta.get("tokens") or [""] * nodes.n_pos)
    n = nodes.n_units
    if order != list(range(n)):  # a subset (e.g. some neurons): their columns only
        idx = torch.tensor(order)
        scores = scores[..., idx]
        extra = {k: (v[..., idx] if v.shape[-1:] == (n,) else v) for k, v in extra.items()}
    return Attribution(
        scores,
        units=cols,
        unit_kind=nodes.kind,
        method=method.name,
        target=target.describe(),
        params={
            **method.params(),
            "units": {
                "kind": nodes.kind,
                "site": nodes.site_kind,
                "per_position": nodes.per_position,
            },
        },
        model_id=lm.name,
        diagnostics=diagnostics,
        meta=meta,
        extra=extra,
    )


@register("atp*", NODE_KINDS)
class AtPStar(Method):
    """AtP*: attribution patching with the QK fix and GradDrop, plus a bound
    on the remaining false negatives (see the module docs).

    By default attrlab adds two exactness fixes to the paper's method where the
    model allows them (each notes in ``diagnostics`` when it does not apply):
    ``next_attn`` (the attention layer after a head unit computed exactly) and
    ``tail_fix`` (the last MLP and final norm computed exactly along the
    direction of change). On saturated models they are what makes the estimate
    track exact patching (zoo IOI, heads x positions: Pearson 0.962 -> 0.998;
    on the previous, more saturated zoo IOI model 0.79 -> 0.997);
    they cost about 1.8x the paper's AtP* (``docs/circuits.md``).
    ``next_attn=False, tail_fix=False`` is the paper's AtP*.

    Args:
        direction, head_site: as for :class:`AtP`.
        qk_fix: recompute the attention softmax for query/key units.
        graddrop: combine the ``L`` dropped-gradient backward passes.
        combine: ``"mean"``: the magnitude is the paper's GradDrop estimate
            ``sum_l |AtP_l| / (L - 1)``; ``"max"`` (default): the larger of that
            and the QK-fixed AtP magnitude. In shallow models the GradDrop mean
            keeps only part of a unit's paths (in a 2-layer model a layer-0
            unit keeps only its direct effect), so ``"max"`` keeps AtP's
            estimate where it is larger and uses GradDrop to flag cancellations.
        bound_samples: units sampled (besides the top ones) and patched exactly
            for the false-negative bound; 0 skips the diagnostic.
        bound_top: units with the largest estimates verified exactly.
        bound_bins: strata (by estimate) for the sampling.
        theta: effect size that counts as a false negative (default: the
            smallest |exact effect| among the verified top units).
        delta: the bound holds with probability at least ``1 - delta``.
        seed: sampling seed.
        ig_steps: ``> 0`` adds per-layer integrated gradients with this many
            midpoint steps (:func:`layer_ig`; ``extra["ig"]``); the magnitude
            becomes the larger of the AtP* magnitude and ``|ig|``, the sign that
            of ``ig``. Off by default (see ``docs/circuits.md`` for when it helps).
        tail_fix: add the non-linear remainder of the last MLP and the final
            norm at the last position along the direction in which the
            counterfactual moves that residual (:func:`_tail_correction`;
            ``extra["atp_tail"]``): one more backward on the same graph and one
            no-grad forward of ``~tail_points`` rows per prompt. Sequential
            models and last-position targets only (else noted in
            ``diagnostics["tail_fix"]``). On by default.
        tail_points: grid size for the exact evaluation along that direction
            (32: results on the zoo IOI model no longer change with a finer
            grid; 16 moves near-tied units by interpolation error).
        next_attn: attrlab's extension of the paper's QK fix to the attention
            layer *after* a head unit (per-position ``z`` / ``head_out`` units of
            sequential models whose scores the wrapper recomputes: plain q.k, or
            rotary through ``scores_qk`` (Llama, Mistral, Qwen2, Gemma, Phi-3); else noted in
            ``diagnostics["next_attn"]``): the unit's change of the residual at
            its position is carried exactly through its block's MLP and the next
            block's norm, and that next layer's queries, keys, values, softmax
            and head outputs are recomputed exactly for the unit
            (:func:`_next_attn_fix`); only the step from them to the metric is
            linearized. Combined with ``tail_fix`` the projection onto the
            tail direction uses the exact change too. On by default
            (``False`` for the paper's AtP*); see ``docs/circuits.md`` for its
            accuracy and cost.
        verify: ``k > 0`` patches the ``k`` units with the largest ``|AtP*|``
            exactly (``patch_sweep``, batched) and replaces their scores with the
            exact effects. The pure estimate stays in ``extra["atp*"]``, the
            replaced units in ``extra["verified"]`` (bool mask), and
            ``diagnostics["verified"] = k``. This is the AtP* workflow (estimate,
            then verify the top candidates); the scores are then no longer a pure
            estimate, so compare estimators on ``extra["atp*"]``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c d", target=" a", units="attn", method="atp*",
        ...                  counterfactual="a c c d", bound_samples=2, bound_top=1)
        >>> "false_negative_bound" in r.diagnostics
        True
        >>> v = al.attribute(lm, "a b c d", target=" a", units="attn", method="atp*",
        ...                  counterfactual="a c c d", verify=1)
        >>> int(v.extra["verified"].sum()), v.diagnostics["verified"]
        (1, 1)
    """

    def __init__(
        self,
        direction: str = "noising",
        head_site: str = "z",
        qk_fix: bool = True,
        graddrop: bool = True,
        combine: str = "max",
        bound_samples: int = 0,
        bound_top: int = 10,
        bound_bins: int = 4,
        theta: float | None = None,
        delta: float = 0.05,
        seed: int = 0,
        progress: bool = False,
        ig_steps: int = 0,
        verify: int = 0,
        tail_fix: bool = True,
        tail_points: int = 32,
        next_attn: bool = True,
    ):
        self.ig_steps = check_int("atp*", "ig_steps", ig_steps, minimum=0)
        self.verify = check_int("atp*", "verify", verify, minimum=0)
        self.tail_fix = tail_fix
        self.next_attn = next_attn
        self.tail_points = check_int("atp*", "tail_points", tail_points, minimum=2)
        self.direction = direction
        self.head_site = head_site
        self.qk_fix = qk_fix
        self.graddrop = graddrop
        if combine not in ("max", "mean"):
            raise InputError(f"combine must be 'max' or 'mean', got {combine!r}")
        self.combine = combine
        self.bound_samples = check_int("atp*", "bound_samples", bound_samples, minimum=0)
        self.bound_top = check_int("atp*", "bound_top", bound_top, minimum=0)
        self.bound_bins = check_int("atp*", "bound_bins", bound_bins)
        self.theta = check_float("atp*", "theta", theta, strict=False, optional=True)
        self.delta = check_float("atp*", "delta", delta, maximum=1.0)
        self.seed = check_int("atp*", "seed", seed, minimum=0)
        self.progress = progress

    def attribute(
        self,
        lm: LM,
        inputs: Inputs,
        target: Target,
        units: Units,
        counterfactual: Inputs | None = None,
    ) -> Attribution:
        nodes, out, diag, base, src = _attribution_patching(
            lm,
            inputs,
            target,
            units,
            counterfactual,
            direction=self.direction,
            head_site=self.head_site,
            star=True,
            graddrop=self.graddrop,
            combine=self.combine,
            qk_fix=self.qk_fix,
            ig_steps=self.ig_steps,
            tail_fix=self.tail_fix,
            tail_points=self.tail_points,
            next_attn=self.next_attn,
        )
        scores = out.pop("atp*")
        estimate = scores
        if self.bound_samples > 0:
            with torch.no_grad():
                _, src_cache = lm.run(src, cache=nodes.sites())
            diag["false_negative_bound"] = false_negative_bound(
                lm,
                base,
                src_cache,
                target,
                nodes,
                estimate,
                n_top=self.bound_top,
                n_samples=self.bound_samples,
                n_bins=self.bound_bins,
                theta=self.theta,
                delta=self.delta,
                seed=self.seed,
                progress=self.progress,
            )
        if self.verify > 0:
            k = min(self.verify, int(estimate.numel()))
            order = torch.argsort(estimate.abs().double(), descending=True, stable=True)
            idx = order[:k].tolist()
            exact = verify_units(
                lm, inputs, counterfactual, target, nodes, idx, self.direction, self.progress
            )
            scores = estimate.clone()
            scores[idx] = exact.to(scores.dtype)
            mask = torch.zeros(estimate.numel(), dtype=torch.bool)
            mask[idx] = True
            out["atp*"] = estimate
            out["verified"] = mask
            diag["verified"] = k
        return _result(lm, nodes, scores, self, target, diag, out, base, units)


def verify_units(
    lm: LM,
    inputs: Inputs,
    counterfactual: Inputs | None,
    target: Target,
    nodes: NodeSet,
    indices: Sequence[int],
    direction: str = "noising",
    progress: bool = False,
) -> Tensor:
    """Exact effects (mean over prompts) of the units ``indices`` of ``nodes``,
    by :func:`attrlab.methods.patching.patch_sweep` (one batched forward row per
    unit and prompt).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> t = al.targets.resolve(" a", lm)
        >>> ns = NodeSet.build(lm, al.units.MlpOut(), n_pos=3)
        >>> verify_units(lm, "a b c", "a c c", t, ns, [1]).shape
        torch.Size([1])
    """
    from .patching import PatchUnit, patch_sweep

    plist = [
        PatchUnit(layer, nodes.site_kind, pos, sub) for layer, pos, sub in map(nodes.unit, indices)
    ]
    if not plist:
        return torch.zeros(0, dtype=torch.float64)
    if counterfactual is None:
        raise InputError("verification patches counterfactual values: pass counterfactual=")
    sw = patch_sweep(
        lm, inputs, counterfactual, target, plist, direction=direction, progress=progress
    )
    return sw.effects.double().mean(0)


# --------------------------------------------------------- diagnostic bound
def _cp_upper(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound on a proportion (k of n), level ``alpha``."""
    if n == 0:
        return 1.0
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    # binomial CDF(k; n, p) is decreasing in p: find p with CDF = alpha
    for _ in range(60):
        mid = (lo + hi) / 2
        cdf = sum(math.comb(n, i) * mid**i * (1 - mid) ** (n - i) for i in range(k + 1))
        if cdf > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def false_negative_bound(
    lm: LM,
    base: Batch,
    source_cache: dict[str, Tensor],
    target: Target,
    nodes: NodeSet,
    estimates: Tensor,
    n_top: int = 10,
    n_samples: int = 32,
    n_bins: int = 4,
    theta: float | None = None,
    delta: float = 0.05,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Subsampling bound on false negatives left by an estimate ranking.

    Verifies the ``n_top`` units with the largest ``|estimates|`` exactly, then
    splits the rest into ``n_bins`` strata by ``|estimate|`` and patches a
    uniform sample of each stratum (``n_samples`` in all, allocated in
    proportion to stratum size, at least one each). With ``k`` of ``m`` samples
    of a stratum of ``N`` above ``theta``, the number of such units in the
    stratum is at most ``N * CP_upper(k, m, delta / n_bins)`` with probability
    ``>= 1 - delta / n_bins``; summed, ``upper_total`` bounds all unverified
    units with ``|effect| > theta`` with probability ``>= 1 - delta``.

    Returns a JSON-able dict: ``theta``, ``delta``, ``verified`` (indices and
    exact effects), ``bins`` and ``upper_total``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> t = al.targets.resolve(" a", lm)
        >>> b, cf = lm.tokenize("a b c"), lm.tokenize("a c c")
        >>> ns = NodeSet.build(lm, al.units.AttnOut(per_position=True), n_pos=3)
        >>> _, src = lm.run(cf, cache=ns.sites())
        >>> d = false_negative_bound(lm, b, src, t, ns, torch.randn(6), n_top=2, n_samples=2,
        ...                          n_bins=2)
        >>> d["upper_total"] >= 0
        True
    """
    n = int(estimates.numel())
    order = torch.argsort(estimates.abs().double(), descending=True, stable=True).tolist()
    top = order[: min(n_top, n)]
    rest = order[len(top) :]
    gen = torch.Generator().manual_seed(seed)
    bins: list[list[int]] = []
    if rest:
        n_bins = max(1, min(n_bins, len(rest)))
        size = math.ceil(len(rest) / n_bins)
        bins = [rest[i : i + size] for i in range(0, len(rest), size)]
    alloc = [0] * len(bins)
    budget = min(n_samples, len(rest))
    for i, b in enumerate(bins):
        alloc[i] = min(len(b), max(1, round(budget * len(b) / max(1, len(rest)))))
    sampled: list[list[int]] = []
    for b, m in zip(bins, alloc):
        perm = torch.randperm(len(b), generator=gen)[:m].tolist()
        sampled.append([b[j] for j in perm])
    all_idx = top + [i for s in sampled for i in s]
    exact = (
        exact_node_effects(lm, base, source_cache, target, nodes, all_idx, progress=progress)
        if all_idx
        else torch.zeros(0)
    )
    eff = dict(zip(all_idx, exact.tolist()))
    if theta is None:  # the smallest non-zero verified effect
        theta = min((abs(eff[i]) for i in top if abs(eff[i]) > 0), default=0.0)
    alpha = delta / max(1, len(bins))
    rows = []
    upper_total = 0.0
    for b, s in zip(bins, sampled):
        k = sum(abs(eff[i]) > theta for i in s)
        up = _cp_upper(k, len(s), alpha)
        n_unverified = len(b) - len(s)
        bound = k + n_unverified * up
        upper_total += bound
        ests = [abs(float(estimates[i].detach())) for i in b]
        rows.append(
            {
                "size": len(b),
                "sampled": len(s),
                "exceed": int(k),
                "estimate_range": [min(ests), max(ests)],
                "max_abs_effect": max((abs(eff[i]) for i in s), default=0.0),
                "upper_fraction": up,
                "upper_count": bound,
            }
        )
    return {
        "theta": float(theta),
        "delta": float(delta),
        "verified": {"index": top, "effect": [eff[i] for i in top]},
        "sampled": [i for s in sampled for i in s],
        "sampled_effect": [eff[i] for s in sampled for i in s],
        "bins": rows,
        "upper_total": float(upper_total),
        "n_exact_patches": len(all_idx),
    }
