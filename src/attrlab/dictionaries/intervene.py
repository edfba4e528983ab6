"""Interventions on dictionary features: clamp, add to, scale or zero chosen
features in a forward pass, many variants in one batched call.

Each variant is a list of edits ``(dictionary index, position, feature, op,
value)`` with ``op`` in ``"set"`` (clamp), ``"add"`` (steer), ``"scale"``.
At each dictionary's output site the activation becomes
``y + (a_new - a) @ W_dec`` where ``a`` are the features of the live input: the
rest of the site (other features, the error) is untouched.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> d = al.dictionaries.Dictionary.random(lm.cfg.d_model, 16, "blocks.1.resid_pre")
    >>> logits = intervene(lm, "a b c", [d], [[], [(0, 2, 3, "set", 5.0)]])
    >>> logits.shape[0], bool((logits[0] != logits[1]).any())
    (2, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..model.interventions import Intervention
from ..model.lock import holds_model_lock
from ..units.features import recorder

__all__ = ["intervene"]

OPS = ("set", "add", "scale")


@holds_model_lock
@torch.no_grad()
def intervene(lm: Any, prompt: Any, dictionaries: Sequence[Any],
              variants: Sequence[Sequence[tuple[int, int, int, str, float]]]) -> Tensor:  # fmt: skip
    """Logits ``[n_variants, pos, vocab]`` of one prompt under each variant's edits
    (an empty variant is the clean run).

    Raises:
        InputError: a bad dictionary index, position, feature or op.
    """
    batch = lm.tokenize(prompt)
    if batch.shape[0] != 1:
        raise InputError("intervene takes one prompt")
    P = batch.shape[1]
    V = len(variants)
    if V == 0:
        raise InputError("give at least one variant (an empty list is the clean run)")
    ds = list(dictionaries)
    plans: list[dict[str, Tensor]] = []
    for d in ds:
        set_v = torch.full((V, P, d.width), float("nan"))
        add_v = torch.zeros(V, P, d.width)
        scale_v = torch.ones(V, P, d.width)
        plans.append({"set": set_v, "add": add_v, "scale": scale_v})
    for j, edits in enumerate(variants):
        for e in edits:
            if len(e) != 5:
                raise InputError(
                    f"an edit is (dictionary, position, feature, op, value); got {e!r}"
                )
            k, p, i, op, value = e
            if not 0 <= int(k) < len(ds):
                raise InputError(f"dictionary index {k} out of range ({len(ds)} given)")
            if not -P <= int(p) < P or not 0 <= int(i) < ds[int(k)].width:
                raise InputError(f"position {p} / feature {i} out of range")
            if op not in OPS:
                raise InputError(f"op must be one of {', '.join(OPS)}, got {op!r}")
            plans[int(k)][op][j, int(p) % P, int(i)] = float(value)
    live: dict[str, Tensor] = {}
    ivs = []
    for d, plan in zip(ds, plans):
        if d.in_site != d.out_site:
            ivs.append(Intervention(d.in_site, recorder(live, d.in_site)))
        ivs.append(Intervention(d.out_site, _edit(d, live, plan)))
    logits, _ = lm.run(batch.repeat(V), interventions=ivs)
    return logits


def _edit(d: Any, live: dict[str, Tensor], plan: dict[str, Tensor]) -> Any:
    def fn(y: Tensor) -> Tensor:
        x = live.get(d.in_site, y) if d.in_site != d.out_site else y
        ct = torch.promote_types(y.dtype, torch.float32)
        a = d.encode(x.to(ct))
        new = a * plan["scale"].to(y.device, ct) + plan["add"].to(y.device, ct)
        s = plan["set"].to(y.device, ct)
        new = torch.where(torch.isnan(s), new, s)
        return y + ((new - a) @ d.W_dec.to(y.device, ct)).to(y.dtype)

    return fn
