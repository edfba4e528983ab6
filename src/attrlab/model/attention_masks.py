"""Additive 4-D attention masks that keep later positions from reading given
token spans (attention suppression), and the probe that a model takes them.

Used by ``method="attention-suppression"`` and by the
:class:`~attrlab.ablations.Suppress` ablation of trace sentences.

Example:
    >>> m = suppression_mask(4, [(1, 2)])
    >>> (m == 0).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["suppression_mask", "check_4d_masks"]


def suppression_mask(
    n_pos: int,
    spans: tuple[int, int] | Sequence[tuple[int, int]],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Additive attention mask ``[n_pos, n_pos]``: causal, and no position after
    a span (one ``(start, end)`` or a list of them) attends to the positions in it.

    Example:
        >>> (suppression_mask(4, (1, 2)) == suppression_mask(4, [(1, 2)])).all().item()
        True
        >>> (suppression_mask(5, [(0, 1), (2, 3)])[4] == 0).int().tolist()
        [0, 1, 0, 1, 1]
    """
    neg = torch.finfo(dtype).min
    m = torch.zeros(n_pos, n_pos, dtype=dtype)
    m[torch.triu(torch.ones(n_pos, n_pos, dtype=torch.bool), 1)] = neg
    one = isinstance(spans, tuple) and len(spans) == 2 and isinstance(spans[0], int)
    pairs: list[Any] = [spans] if one else list(spans)
    for a, b in pairs:
        m[int(b) :, int(a) : int(b)] = neg
    return m


def check_4d_masks(lm: Any, ids: Tensor, base: Tensor, what: str, hint: str = "") -> None:
    """Refuse models whose forward does not take an additive 4-D attention mask
    (ALiBi models, OPT's positions from the mask): the plain causal mask in 4-D
    form must give the model's own logits ``base [pos, vocab]`` on ``ids [1, pos]``.

    Raises:
        UnsupportedArchitectureError: naming ``what`` needs the masks (then ``hint``).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> check_4d_masks(lm, ids, lm.hf_forward(ids)[0][0], "this")  # no error
    """
    from ..errors import UnsupportedArchitectureError

    causal = suppression_mask(ids.shape[1], [], lm.dtype)[None, None].to(lm.device)
    why = ""
    try:
        same, _ = lm.hf_forward(ids, attention_mask=causal)
        if not torch.allclose(same[0].float(), base.float(), atol=1e-4, rtol=1e-3):
            why = "its logits change under an all-causal 4-D mask"
    except (ValueError, IndexError, RuntimeError, TypeError) as e:
        why = f"{type(e).__name__}: {e}"
    if why:
        raise UnsupportedArchitectureError(
            f"{what} needs a model whose forward takes an additive 4-D attention mask; "
            f"{lm.cfg.family} does not ({why})" + (f". {hint}" if hint else "")
        )
