"""Interventions: set, add to, or scale (gate) a site during a forward pass.

An intervention selects part of a site's tensor with ``rows`` (batch rows),
``positions`` and ``heads`` and changes it. Index arguments that are tensors
or lists are combined as in NumPy advanced indexing, so equal-length index
vectors are *paired*: ``rows=[0, 1, 2], positions=[4, 5, 6]`` changes
``(0, 4)``, ``(1, 5)`` and ``(2, 6)`` — many different patches in one batched
forward. ``None`` selects everything along that axis.

Example:
    >>> import torch, attrlab as al
    >>> from attrlab.model.interventions import Intervention
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> zero_head = Intervention("blocks.0.attn.z", 0.0, heads=1)
    >>> logits, _ = lm.run(["a b c", "a b c"], interventions=[
    ...     Intervention("blocks.0.attn.z", 0.0, rows=[1], heads=[1])])
    >>> bool((logits[0] != logits[1]).any())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import Tensor

from ..errors import IndexRangeError, InputError

Index = Union[int, Sequence[int], Tensor, None]
Value = Union[Tensor, float, Callable[[Tensor], Tensor]]


@dataclass
class Intervention:
    """Change ``site`` where ``rows``/``positions``/``heads`` select.

    Args:
        site: a site name (see :mod:`attrlab.model.sites`).
        value: a tensor broadcastable to the selection, a number, or a
            callable mapping the selected values to new ones.
        op: ``"set"`` (replace), ``"add"``, or ``"scale"`` (multiply; with a
            tensor that requires grad, this is a differentiable *gate*).
        rows, positions, heads: indices; ``None`` = all.
    """

    site: str
    value: Value
    op: Literal["set", "add", "scale"] = "set"
    rows: Index = None
    positions: Index = None
    heads: Index = None

    def __post_init__(self) -> None:
        if self.op not in ("set", "add", "scale"):
            raise InputError(f"intervention op must be 'set', 'add' or 'scale', not {self.op!r}")


def _as_index(idx: Index, size: int, axis: str, device: torch.device) -> Tensor | slice:
    if idx is None:
        return slice(None)
    t = torch.as_tensor(idx, dtype=torch.long, device=device)
    if t.numel() and (int(t.max()) >= size or int(t.min()) < -size):
        raise IndexRangeError(
            f"intervention {axis} index out of range: got {t.tolist()}, size is {size}"
        )
    return t


def selection(iv: Intervention, x: Tensor, head_axis: int | None) -> tuple:
    """The advanced-indexing tuple that ``iv`` selects in ``x`` ``[batch, pos, ...]``."""
    idx: list[Tensor | slice] = [
        _as_index(iv.rows, x.shape[0], "row", x.device),
        _as_index(iv.positions, x.shape[1], "position", x.device),
    ]
    if iv.heads is not None:
        if head_axis is None:
            raise InputError(f"site {iv.site!r} has no head axis; drop heads=")
        idx.append(_as_index(iv.heads, x.shape[head_axis], "head", x.device))
    # scalar indices keep their axis so that values broadcast predictably
    return tuple(i.reshape(1) if isinstance(i, Tensor) and i.dim() == 0 else i for i in idx)


def apply(ivs: Sequence[Intervention], x: Tensor, head_axis: int | None) -> Tensor:
    """Return ``x`` with every intervention applied in order (out of place,
    differentiable with respect to ``x`` and to tensor values)."""
    for iv in ivs:
        sel = selection(iv, x, head_axis)
        old = x[sel]
        if callable(iv.value):
            new = iv.value(old)
            if iv.rows is None and iv.positions is None and iv.heads is None:
                if new is old:  # a callable that only reads: the very tensor, no copy
                    continue
                if new.shape == x.shape and (new.requires_grad or not torch.is_grad_enabled()):
                    x = new.to(x.device, x.dtype)  # the whole site replaced (and in the graph)
                    continue
        else:
            v = torch.as_tensor(iv.value, device=x.device)
            if not v.requires_grad:
                v = v.to(x.dtype)
            new = v if iv.op == "set" else old + v if iv.op == "add" else old * v
        y = x.clone()
        new = new.to(x.device, x.dtype)  # a value from another device (device_map)
        y[sel] = new.expand_as(old) if new.dim() <= old.dim() else new
        x = y
    return x
