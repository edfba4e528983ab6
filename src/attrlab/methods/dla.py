"""Direct logit attribution (DLA): split a target logit into the residual-stream
parts that write it.

The final residual stream at the last position is a sum: embeddings + each
layer's attention output + each MLP output. Freezing the final norm's scale
from the clean run (and keeping LayerNorm's centering, which is linear) makes
the map from the residual to the logit linear, so every part gets an exact
share ``part . d_eff`` where ``d_eff`` is the unembedding column (or the
difference of two columns) pulled back through the frozen norm. Finer parts:

* **heads**: ``blocks.{l}.attn.head_out`` (the output projection split per head;
  Gemma 2/3's post-attention norm is frozen the same way), plus the
  projection bias of each layer;
* **heads x source position** (``per_source=True``): a head's output at the
  last position is ``sum_k pattern[q, k] * v[k] @ W_O[h]``; each source
  position ``k`` gets its term (eager attention only);
* **neurons**: MLP post-activation x its row of the output projection, plus
  the output bias;
* **experts** (mixture-of-experts MLPs): each expert's routing-weighted output
  (``blocks.{l}.mlp.experts``; a shared expert is the last slot) — they sum
  to the layer's MLP part;
* **layers**: embeddings, then attention + MLP of each block.

With every part included (``complete=True``) the scores sum to the target
logit minus the unembedding bias (for a logit difference: minus the bias
difference). For soft-capped models (Gemma 2) this is the logit *before* the
soft-cap ``tanh``; the soft-cap is not linear.

Scores for several prompts are the mean over prompts, or one row per prompt
with ``per_prompt=True``.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "When Mary and John went", target=" Mary", units="heads",
    ...                  method="dla", complete=True)
    >>> abs(r.diagnostics["completeness_error"]) < 1e-4
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..model.wrapper import LM, Batch, Inputs
from ..result import Attribution
from ..targets import Logit, LogitDiff, Target
from ..units.base import Units
from ..units.components import AttnOut, Experts, Heads, Layers, MlpOut, Neurons
from .base import Method, register

__all__ = ["DirectLogitAttribution", "dla_parts", "target_directions"]


def _per_row(ids: Tensor | int, n: int) -> Tensor:
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        return t.expand(n)
    if t.numel() != n:
        raise InputError(f"{t.numel()} target tokens for {n} prompts")
    return t


def target_directions(
    lm: LM, target: Target, n: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Unembedding directions of a logit or logit-difference target.

    Returns ``(direction [n, d_model], bias [n], a_ids [n], b_ids [n] or None)``:
    the target (before soft-capping) is ``final_norm_output . direction + bias``.

    Raises:
        InputError: the target is not a logit or a logit difference.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> d, b, a, _ = target_directions(lm, al.targets.resolve(" Mary", lm), 1)
        >>> tuple(d.shape) == (1, lm.cfg.d_model)
        True
    """
    W_U = lm.W_U().detach()  # [d_model, vocab]
    b_U = lm.b_U()
    if isinstance(target, LogitDiff):
        a = _per_row(target.a._require(), n)
        b: Tensor | None = _per_row(target.b._require(), n)
    elif isinstance(target, Logit) and type(target).value is Logit.value:
        a, b = _per_row(target._require(), n), None
    else:
        raise InputError(
            "direct logit attribution explains a logit (target=' Mary') or a logit difference "
            f"(target=(' Mary', ' John')); got {target.describe()}. Log-probabilities are not "
            "linear in the residual stream."
        )
    a = a.to(W_U.device)
    direction = W_U[:, a].T.double()
    bias = torch.zeros(n, dtype=torch.float64, device=W_U.device)
    if b_U is not None:
        bias = bias + b_U.detach()[a].double()
    if b is not None:
        b = b.to(W_U.device)
        direction = direction - W_U[:, b].T.double()
        if b_U is not None:
            bias = bias - b_U.detach()[b].double()
    return direction, bias, a, b


def _norm_bias_dot(lm: LM, norm: str, vec: Tensor) -> Tensor:
    """``vec . bias`` of the norm ``norm`` (zero for norms without a bias), ``[n]``."""
    b = lm.norm_bias(norm)
    if b is None:
        return torch.zeros(vec.shape[0], dtype=torch.float64, device=vec.device)
    return vec @ b.detach().double()


def dla_parts(
    lm: LM,
    batch: Batch,
    target: Target,
    attn: str = "heads",
    mlp: str = "whole",
) -> tuple[list[dict[str, Any]], Tensor, dict[str, Any]]:
    """Every additive part of the target at the last position.

    Args:
        attn: ``"heads"``, ``"source"`` (head x source position) or ``"whole"``.
        mlp: ``"neurons"``, ``"whole"`` or ``"experts"`` (mixture-of-experts
            layers split per expert; dense layers whole).

    Returns:
        ``(labels, values, info)``: one label dict per part (``component``,
        ``layer``, ``head``, ``source``, ``neuron``, ``expert``), ``values [n_prompts,
        n_parts]`` (float64), and ``info`` with ``target_minus_bias [n]`` (the
        model's own pre-soft-cap target minus the unembedding bias) and
        ``bias [n]``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> t = al.targets.resolve(" Mary", lm)
        >>> labels, values, info = dla_parts(lm, lm.tokenize("a b c"), t)
        >>> bool(torch.allclose(values.sum(-1), info["target_minus_bias"], atol=1e-4))
        True
    """
    c = lm.cfg
    L = c.n_layers
    sites = ["blocks.0.resid_pre", "final_norm.scale", "unembed"]
    for layer in range(L):
        p = f"blocks.{layer}."
        sites += [p + "attn.out", p + "mlp.out"]
        if attn in ("heads", "source"):
            sites.append(p + "attn.head_out")
        if attn == "source":
            sites += [p + "attn.pattern", p + "attn.v"]
        if attn != "whole" and lm.has_norm(p + "attn_out_norm"):
            sites.append(p + "attn.z")  # to recompute the post-attention norm's input
        if mlp == "neurons":
            sites.append(p + "mlp.neurons")
        if mlp == "experts" and lm.has_experts(layer):
            sites.append(p + "mlp.experts")
    with torch.no_grad():
        _, cache = lm.run(batch, cache=sites)
    n = batch.shape[0]
    direction, bias, a_ids, b_ids = target_directions(lm, target, n)
    # the direction pulled back through the final norm with its clean-run scale frozen
    eff = lm.frozen_norm_T("final_norm", direction, cache["final_norm.scale"][:, -1])  # [n, d]

    def dot(x: Tensor, vec: Tensor = eff) -> Tensor:  # x [n, d_model] at the last position
        return (x.double() * vec).sum(-1)

    labels: list[dict[str, Any]] = []
    cols: list[Tensor] = []

    def add(value: Tensor, **lab: Any) -> None:
        labels.append(
            {
                "component": lab.pop("component"),
                "layer": -1,
                "head": -1,
                "source": -1,
                "neuron": -1,
                "expert": -1,
                **lab,
            }
        )
        cols.append(value)

    add(dot(cache["blocks.0.resid_pre"][:, -1]), component="embed")
    for layer in range(L):
        p = f"blocks.{layer}."
        if attn == "whole":
            add(dot(cache[p + "attn.out"][:, -1]), component="attn", layer=layer)
        else:
            head_out = cache[p + "attn.head_out"][:, -1]  # [n, h, d]
            out_norm = p + "attn_out_norm"
            # eff pulled back through the frozen post-attention norm (if any)
            if lm.has_norm(out_norm):
                W_O = lm.W_O(layer).detach()
                b_O = lm.b_O(layer)
                y = torch.einsum("nhd,hdm->nm", cache[p + "attn.z"][:, -1], W_O)
                if b_O is not None:
                    y = y + b_O.detach()
                post = lm.frozen_norm_T(out_norm, eff, lm.norm_scale(out_norm, y))
                bias_part = _norm_bias_dot(lm, out_norm, eff)
            else:
                post = eff
                bias_part = torch.zeros(n, dtype=torch.float64)
            if attn == "heads":
                for h in range(c.n_heads):
                    add(dot(head_out[:, h]), component="head", layer=layer, head=h)
            else:
                pattern = cache[p + "attn.pattern"][:, :, -1]  # [n, h, k]
                v = cache[p + "attn.v"]  # [n, k, kv, dh]
                v = v.repeat_interleave(c.n_heads // c.n_kv_heads, dim=2)  # [n, k, h, dh]
                W_O = lm.W_O(layer).detach().double()  # [h, dh, d]
                g = torch.einsum("hdm,nm->nhd", W_O, post)  # [n, h, dh]
                per = torch.einsum("nkhd,nhd->nhk", v.double(), g) * pattern.double()
                toks = batch.shape[1]
                for h in range(c.n_heads):
                    for k in range(toks):
                        add(per[:, h, k], component="head_source", layer=layer, head=h, source=k)
            b_O = lm.b_O(layer)
            bo = (post * b_O.detach().double()).sum(-1) if b_O is not None else 0.0
            add(bo + bias_part, component="attn_bias", layer=layer)
        if mlp == "experts" and lm.has_experts(layer):
            per_expert = cache[p + "mlp.experts"][:, -1]  # [n, expert, d]
            for e in range(per_expert.shape[1]):
                add(dot(per_expert[:, e]), component="expert", layer=layer, expert=e)
        elif mlp in ("whole", "experts"):
            add(dot(cache[p + "mlp.out"][:, -1]), component="mlp", layer=layer)
        else:
            acts = cache[p + "mlp.neurons"][:, -1].double()  # [n, d_mlp]
            W_out = lm.W_out(layer).detach().double()  # [d_mlp, d]
            b_out = lm.b_out(layer)
            out_norm = p + "mlp_out_norm"
            if lm.has_norm(out_norm):
                y = acts @ W_out
                if b_out is not None:
                    y = y + b_out.detach().double()
                post = lm.frozen_norm_T(out_norm, eff, lm.norm_scale(out_norm, y))
                bias_part = _norm_bias_dot(lm, out_norm, eff)
            else:
                post = eff
                bias_part = torch.zeros(n, dtype=torch.float64)
            per_neuron = acts * (post @ W_out.T)  # [n, d_mlp]
            for i in range(c.d_mlp):
                add(per_neuron[:, i], component="neuron", layer=layer, neuron=i)
            bo = (post * b_out.detach().double()).sum(-1) if b_out is not None else 0.0
            add(bo + bias_part, component="mlp_bias", layer=layer)
    fb = _norm_bias_dot(lm, "final_norm", direction)
    if bool((fb != 0).any()):
        add(fb, component="final_norm_bias")
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64).expand(n) for v in cols], -1)
    pre_cap = cache["unembed"][:, -1].double()  # model's own logits before soft-capping
    tgt = pre_cap.gather(-1, a_ids[:, None].to(pre_cap.device))[:, 0]
    if b_ids is not None:
        tgt = tgt - pre_cap.gather(-1, b_ids[:, None].to(pre_cap.device))[:, 0]
    info = {"target_minus_bias": tgt - bias, "bias": bias}
    return labels, values, info


_COMPONENTS_OF = {
    "heads": {"head"},
    "source": {"head_source"},
    "neurons": {"neuron"},
    "experts": {"expert"},
    "attn": {"attn"},
    "mlp": {"mlp"},
}


@register("dla", ("heads", "layers", "attn", "mlp", "neurons", "experts"))
class DirectLogitAttribution(Method):
    """Direct logit attribution (``method="dla"``): exact additive shares of a logit
    or logit difference at the last position.

    Options:
        per_source: with ``units="heads"``, one unit per (layer, head, source
            position) (needs eager attention).
        complete: also return every remaining part (embeddings, biases, the
            other components) so that the scores sum to the target logit minus
            the unembedding bias (pre-soft-cap for Gemma 2).
        per_prompt: scores ``[n_prompts, n_units]`` instead of the mean.

    ``diagnostics["completeness_error"]`` is the largest ``|sum of all parts -
    (target - unembedding bias)|`` over prompts.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> r = al.attribute(lm, "a b c", target=(" a", " b"), units="neurons", method="dla")
        >>> len(r) == lm.cfg.n_layers * lm.cfg.d_mlp
        True
    """

    def __init__(self, per_source: bool = False, complete: bool = False, per_prompt: bool = False):
        self.per_source = per_source
        self.complete = complete
        self.per_prompt = per_prompt

    def attribute(
        self,
        lm: LM,
        inputs: Inputs,
        target: Target,
        units: Units,
        counterfactual: Inputs | None = None,
    ) -> Attribution:
        if counterfactual is not None:
            raise InputError("direct logit attribution uses one run; drop counterfactual=")
        if self.per_source and not isinstance(units, Heads):
            raise InputError("per_source=True works with units='heads'")
        if getattr(units, "per_position", False):
            raise InputError(
                "DLA explains the last position; for per-position head scores use "
                "per_source=True (head x source position)"
            )
        batch = target.prepare(lm, lm.tokenize(inputs))
        if not target.next_token:
            raise InputError("DLA explains a next-token logit at the last position")
        if isinstance(units, Heads):
            attn, mlp = ("source" if self.per_source else "heads"), "whole"
        elif isinstance(units, Neurons):
            attn, mlp = "whole", "neurons"
        elif isinstance(units, Experts):
            if units.site == "router":
                raise InputError(
                    "dla needs parts that write to the residual stream; router logits do not. "
                    "Use al.units.Experts() (the experts' outputs), or an estimator such as "
                    "occlusion or atp over Experts(site='router')"
                )
            units.moe_layers(lm)  # a typed error for models without experts
            attn, mlp = "whole", "experts"
        elif isinstance(units, (AttnOut, MlpOut, Layers)):
            attn, mlp = "whole", "whole"
        else:
            raise InputError(f"DLA does not support units={units.kind!r}")
        labels, values, info = dla_parts(lm, batch, target, attn=attn, mlp=mlp)
        if isinstance(units, Layers):
            labels, values = _merge_blocks(labels, values)
        selected = self._select(lm, units, labels)
        keep = list(range(len(labels))) if self.complete else selected
        total_err = (values.sum(-1) - info["target_minus_bias"]).abs().max().item()
        rest = values.sum(-1) - values[:, selected].sum(-1)
        vals = values[:, keep].float()
        scores = vals if self.per_prompt else vals.mean(0)
        cols = _columns(lm, batch, [labels[i] for i in keep], units, self.per_source, self.complete)
        return Attribution(
            scores,
            units=cols,
            unit_kind=units.kind,
            method="dla",
            target=target.describe(),
            params={**self.params(), "units": units.params()},
            model_id=lm.name,
            diagnostics={
                "completeness_error": total_err,
                "target_minus_bias": info["target_minus_bias"].mean().item(),
                "unembed_bias": info["bias"].mean().item(),
                "rest": rest.mean().item(),
                "softcapped": bool(lm.cfg.final_logit_softcap),
            },
            rows={"prompt": list(range(batch.shape[0]))} if self.per_prompt else None,
            meta={"prompt_tokens": _tokens(lm, batch)},
            extra={"target_minus_bias": info["target_minus_bias"].float(), "rest": rest.float()},
        )

    def _select(self, lm: LM, units: Units, labels: list[dict[str, Any]]) -> list[int]:
        kind = "source" if self.per_source else units.kind
        comps = _COMPONENTS_OF.get(kind, {"embed", "block", "final_norm_bias"})
        layers = set(units.layer_list(lm.cfg.n_layers))  # type: ignore[attr-defined]
        heads = set(units.head_list(lm.cfg.n_heads)) if isinstance(units, Heads) else None
        neurons = set(units.neuron_list(lm.cfg.d_mlp)) if isinstance(units, Neurons) else None
        n_slots = lm.cfg.n_experts + lm.cfg.n_shared_experts
        experts = set(units.expert_list(n_slots)) if isinstance(units, Experts) else None
        out = []
        for i, lab in enumerate(labels):
            if lab["component"] not in comps:
                continue
            if lab["layer"] >= 0 and lab["layer"] not in layers:
                continue
            if heads is not None and lab["head"] not in heads:
                continue
            if neurons is not None and lab["neuron"] not in neurons:
                continue
            if experts is not None and lab["expert"] not in experts:
                continue
            out.append(i)
        return out


def _merge_blocks(
    labels: list[dict[str, Any]], values: Tensor
) -> tuple[list[dict[str, Any]], Tensor]:
    """Embeddings, one part per block (attention + MLP + biases), final-norm bias."""
    out_labels: list[dict[str, Any]] = []
    out_cols: list[Tensor] = []
    index: dict[tuple[str, int], int] = {}
    for i, lab in enumerate(labels):
        comp = lab["component"] if lab["layer"] < 0 else "block"
        key = (comp, lab["layer"])
        if key not in index:
            index[key] = len(out_cols)
            out_labels.append({**lab, "component": comp})
            out_cols.append(values[:, i].clone())
        else:
            out_cols[index[key]] += values[:, i]
    return out_labels, torch.stack(out_cols, -1)


def _tokens(lm: LM, batch: Batch) -> list[str]:
    ids = batch.input_ids[0]
    return lm.to_str_tokens(ids) if lm.tokenizer is not None else [str(int(t)) for t in ids]


def _columns(
    lm: LM,
    batch: Batch,
    labels: list[dict[str, Any]],
    units: Units,
    per_source: bool,
    complete: bool,
) -> dict[str, list[Any]]:
    names = ["layer"]
    if complete or isinstance(units, Layers):
        names = ["component", "layer"]
    if isinstance(units, Heads):
        names.append("head")
    if per_source:
        names.append("source")
    if isinstance(units, Neurons):
        names.append("neuron")
    if isinstance(units, Experts):
        names.append("expert")
    cols = {k: [lab[k] for lab in labels] for k in names}
    if per_source:
        toks = _tokens(lm, batch)
        cols["token"] = [toks[s] if s >= 0 else "" for s in cols["source"]]
    return cols
