"""Logit lens: read the residual stream at every layer through the model's own
final norm and unembedding.

For each layer ``l`` the residual stream entering it (``blocks.{l}.resid_pre``)
and, last, the stream leaving the final block (the input of the final norm) is
normalized with the model's final norm (its own scale for that residual, not a
frozen one), unembedded, soft-capped if the model does so, and turned into
log-probabilities. The last row is therefore the model's real output
distribution.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.logit_lens(lm, "When Mary and John went to the store", target=" Mary")
    >>> len(r) == lm.cfg.n_layers + 1
    True
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from ..model.lock import holds_model_lock
from ..model.wrapper import LM, Inputs
from ..result import Attribution
from ..targets import Logit, TopToken, _TokenTarget
from ..targets import resolve as resolve_target

__all__ = ["logit_lens", "LensResult"]


class LensResult(Attribution):
    """An :class:`~attrlab.result.Attribution` of the logit lens whose table also
    shows each unit's target rank and top-k tokens.

    ``scores``: target log-probability per (layer[, position]);
    ``extra["rank"]``: the target's rank (1 = top token);
    ``extra["topk_ids"]``, ``extra["topk_logprobs"]``: ``[n_units, k]``;
    ``meta["topk_tokens"]``: the top-k tokens as text.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> df = al.logit_lens(lm, "a b c", k=3).to_pandas()
        >>> {"rank", "top_tokens", "top_logprobs"} <= set(df.columns)
        True
    """

    def to_pandas(self, row: int | None = None) -> Any:
        df = super().to_pandas(row)
        if self.scores.dim() == 1:
            df = df.rename(columns={"score": "logprob"})
            df["rank"] = self.extra["rank"].tolist()
            df["top_tokens"] = self.meta.get("topk_tokens") or self.extra["topk_ids"].tolist()
            df["top_logprobs"] = [
                [round(float(x), 4) for x in r] for r in self.extra["topk_logprobs"]
            ]
        return df


@holds_model_lock
def logit_lens(
    lm: LM,
    prompt: Inputs,
    target: Any = None,
    k: int = 5,
    positions: str = "last",
    prepend_bos: bool | None = None,
    lens: Any = None,
) -> LensResult:
    """Per layer (and position), the target's log-probability and rank and the top-k
    tokens when the residual stream is read with the final norm and unembedding.

    Args:
        lm: the wrapped model.
        prompt: one prompt (text or token ids).
        target: a token (text or id), or None for the model's own top
            prediction at each position.
        k: how many top tokens to keep per unit.
        positions: ``"last"`` (the next-token position) or ``"all"``.
        prepend_bos: as in :meth:`attrlab.LM.tokenize`.
        lens: a :class:`attrlab.lenses.TunedLens`: each layer's residual is
            translated before it is read (the tuned lens; ``method`` is then
            ``"tuned_lens"``). None: the logit lens.

    Returns:
        :class:`LensResult` with units ``layer`` (``n_layers`` = after the last
        block), ``site`` and, for ``positions="all"``, ``position`` and ``token``;
        ``extra["kl_to_final"]``: ``KL(p_final || p_layer)`` per unit.

    Raises:
        InputError: several prompts, a bad ``positions`` or ``k``, a target that
            is not a single token.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> df = al.logit_lens(lm, "a b c", positions="all").to_pandas()
        >>> len(df) == (lm.cfg.n_layers + 1) * 3
        True
    """
    if positions not in ("last", "all"):
        raise InputError(f"positions must be 'last' or 'all', got {positions!r}")
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    if lens is not None:
        from ..lenses import TunedLens

        if not isinstance(lens, TunedLens):
            raise InputError(
                "lens must be an al.lenses.TunedLens (train_tuned_lens / TunedLens.load)"
            )
        lens.check(lm)
    batch = lm.tokenize(prompt, prepend_bos)
    if batch.shape[0] != 1:
        raise InputError(f"logit_lens explains one prompt; got {batch.shape[0]}")
    L = lm.cfg.n_layers
    sites = [f"blocks.{layer}.resid_pre" for layer in range(L)] + ["final_norm.input"]
    with torch.no_grad():
        logits, cache = lm.run(batch, cache=sites)
    n_pos = batch.shape[1]
    pos_list = list(range(n_pos)) if positions == "all" else [n_pos - 1]
    pos_t = torch.tensor(pos_list, device=logits.device)
    # target ids per position
    if target is None:
        tid = logits[0, pos_t].argmax(-1)  # [n_pos_sel]
        tdesc = "top prediction"
    else:
        t = resolve_target(target, lm)
        if not isinstance(t, _TokenTarget) or isinstance(t, TopToken) or not isinstance(t, Logit):
            raise InputError(
                "logit_lens needs a single token target (' Mary' or an id) or None; "
                f"got {t.describe()}"
            )
        ids = torch.as_tensor(t._require()).reshape(-1)
        if ids.numel() != 1:
            raise InputError("logit_lens takes one target token")
        tid = ids.to(logits.device).expand(len(pos_list))
        tdesc = f"logprob({t.token!r})"
    k = min(k, lm.cfg.d_vocab)
    scores, ranks, top_ids, top_lp, kls = [], [], [], [], []
    final = logits[0, pos_t].float().log_softmax(-1)  # [n_sel, V]
    with torch.no_grad():
        for layer, name in enumerate(sites):
            resid = cache[name][0, pos_t]  # [n_sel, d_model]
            if lens is not None and layer < L:
                resid = lens.translate(resid, layer)
            lp = lm.unembed(lm.apply_final_norm(resid)).float().log_softmax(-1)  # [n_sel, V]
            kls.append((final.exp() * (final - lp)).sum(-1).clamp_min(0))
            tl = lp.gather(-1, tid[:, None])[:, 0]
            scores.append(tl)
            ranks.append((lp > tl[:, None]).sum(-1) + 1)
            v, i = lp.topk(k, dim=-1)
            top_ids.append(i)
            top_lp.append(v)
    # units: layer-major, position-minor
    score_t = torch.stack(scores).reshape(-1).cpu()
    rank_t = torch.stack(ranks).reshape(-1).cpu()
    top_ids_t = torch.stack(top_ids).reshape(-1, k).cpu()
    top_lp_t = torch.stack(top_lp).reshape(-1, k).cpu()
    kl_t = torch.stack(kls).reshape(-1).double().cpu()
    site_names = [f"blocks.{layer}.resid_pre" for layer in range(L)] + [
        f"blocks.{L - 1}.resid_post"
    ]
    units: dict[str, list[Any]] = {
        "layer": [layer for layer in range(L + 1) for _ in pos_list],
        "site": [s for s in site_names for _ in pos_list],
    }
    meta: dict[str, Any] = {"positions": positions}
    if lm.tokenizer is not None:
        toks = lm.to_str_tokens(batch.input_ids[0])
        names = lm.to_str_tokens(top_ids_t)  # one call for every row's top k
        meta["topk_tokens"] = [names[i : i + k] for i in range(0, len(names), k)]
        meta["target_tokens"] = lm.to_str_tokens(tid.cpu())
    else:
        toks = [str(int(x)) for x in batch.input_ids[0]]
    if positions == "all":
        units["position"] = [p for _ in range(L + 1) for p in pos_list]
        units["token"] = [toks[p] for _ in range(L + 1) for p in pos_list]
    meta["prompt_tokens"] = toks
    return LensResult(
        score_t,
        units=units,
        unit_kind="layers",
        method="logit_lens" if lens is None else "tuned_lens",
        target=tdesc,
        params={
            "k": k,
            "positions": positions,
            **({"lens": lens.meta} if lens is not None else {}),
        },
        model_id=lm.name,
        meta=meta,
        extra={
            "rank": rank_t,
            "topk_ids": top_ids_t,
            "topk_logprobs": top_lp_t,
            "target_ids": tid.cpu(),
            "kl_to_final": kl_t,
        },
    )
