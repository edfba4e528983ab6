"""Temporary replacement of module forwards, under the model's lock.

Gradient methods change how some modules differentiate (shared activation
derivatives, prefix-skipping linear backwards, the relevance rules of
:mod:`attrlab.lrp`) without changing their values: they swap a module's
``forward`` for a wrapper around the original for the length of one call. The
swap holds the model's lock (:func:`attrlab.model.lock.model_lock`), the new
forwards act only in the thread that installed them, and the originals come
back on exit, also after an error.

Example:
    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.ReLU())
    >>> with swapped_forwards(m, lambda mod: (lambda x: x * 0) if isinstance(mod, torch.nn.ReLU) else None) as n:
    ...     y = m(torch.ones(2))
    >>> n, y.tolist(), m(torch.ones(2)).tolist()
    (1, [0.0, 0.0], [1.0, 1.0])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from .lock import model_lock

__all__ = ["swapped_forwards", "elementwise_types", "RULE_MARK"]

#: attribute set on forwards installed by :mod:`attrlab.lrp`; other swaps leave
#: such modules alone (their rules already define the backward)
RULE_MARK = "_attrlab_rule"


@contextlib.contextmanager
def swapped_forwards(
    model: nn.Module, wrap: Callable[[nn.Module], Callable[..., Tensor] | None]
) -> Iterator[int]:
    """Replace ``forward`` of every module of ``model`` for which ``wrap`` returns
    a new one (holding the model's lock); restore them on exit. Yields how many
    were replaced. ``wrap`` should return forwards that act only in the calling
    thread (and call the original otherwise)."""
    patched: list[tuple[nn.Module, Any]] = []
    with model_lock(model), contextlib.ExitStack() as stack:
        stack.callback(_restore_forwards, patched)
        for m in model.modules():
            new = wrap(m)
            if new is None:
                continue
            patched.append((m, m.__dict__.get("forward")))
            m.forward = new  # type: ignore[method-assign]
        yield len(patched)


def _restore_forwards(patched: list[tuple[nn.Module, Any]]) -> None:
    for m, fwd in reversed(patched):
        if fwd is None:
            del m.forward
        else:
            m.forward = fwd  # type: ignore[method-assign]


def has_rule(m: nn.Module) -> bool:
    """True if ``m``'s forward was swapped by a relevance rule (:mod:`attrlab.lrp`)."""
    return bool(getattr(m.__dict__.get("forward"), RULE_MARK, False))


def elementwise_types() -> tuple[type, ...]:
    """Parameter-free elementwise activation module types (PyTorch and Hugging Face).

    Example:
        >>> import torch
        >>> torch.nn.GELU in elementwise_types()
        True
    """
    types: list[type] = [
        nn.GELU, nn.SiLU, nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.Hardswish,
        nn.LeakyReLU, nn.Mish, nn.Softplus,
    ]  # fmt: skip
    try:
        from transformers import activations as hf_act
    except ImportError:  # pragma: no cover - transformers is a dependency
        return tuple(types)
    for name in (
        "AccurateGELUActivation", "ClippedGELUActivation", "FastGELUActivation",
        "GELUActivation", "GELUTanh", "LaplaceActivation", "MishActivation",
        "NewGELUActivation", "PytorchGELUTanh", "QuickGELUActivation",
        "ReLUSquaredActivation", "SiLUActivation", "SqrtSoftplusActivation",
    ):  # fmt: skip
        t = getattr(hf_act, name, None)
        if isinstance(t, type):
            types.append(t)
    return tuple(types)
