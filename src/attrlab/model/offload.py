"""Models dispatched by accelerate (``device_map``): offloaded weights and devices.

With ``device_map`` entries ``"cpu"`` or ``"disk"`` accelerate keeps a module's
weights on the ``meta`` device and loads them (from RAM or from files) only
inside that module's own forward. attrlab's runs go through the model's forward
and read single weights with :func:`attrlab.model.adapters.base.param`, so they
need nothing more. Two things do:

- per-example gradients with ``torch.func`` (:mod:`attrlab.data`: TRAK,
  TracIn, gradient similarity) pass the parameters into the forward
  themselves, which accelerate's loading would overwrite (and cannot do inside
  a ``torch.func`` transform): :func:`onloaded` loads the offloaded weights for
  the length of a block and turns the loading off, then puts everything back;
- hashing a checkpoint reads every tensor: :func:`state_items` loads them one
  at a time.

:func:`module_device` is where a module computes (its execution device), the
device hooks move the tensors they write into.

Example:
    >>> from torch import nn
    >>> net = nn.Linear(2, 3)
    >>> has_offload(net), [n for n, _ in state_items(net)]
    (False, ['bias', 'weight'])
    >>> with onloaded(net):
    ...     net.weight.device.type
    'cpu'
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .adapters.base import _offload_hooks
from .lock import model_lock

__all__ = ["has_offload", "materialised", "module_device", "onloaded", "state_items"]


def materialised(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` (a weight or bias) as a real tensor: loaded from
    accelerate's weights map when the module is offloaded (its parameters sit on
    the meta device outside its own forward), else the attribute itself.

    Example:
        >>> import torch
        >>> materialised(torch.nn.Linear(2, 3), "bias").shape
        torch.Size([3])
    """
    from .adapters.base import param

    return param(module, name)


def has_offload(model: nn.Module) -> bool:
    """Whether accelerate offloads some of ``model``'s weights (CPU / disk offload).

    Example:
        >>> from torch import nn
        >>> has_offload(nn.Linear(2, 2))
        False
    """
    return any(_offload_hooks(m) for m in model.modules())


def module_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: accelerate's execution device when a
    dispatch hook sets one, else the device of its first parameter or buffer
    that is not on ``meta`` (CPU if it has none).

    Example:
        >>> from torch import nn
        >>> module_device(nn.Linear(2, 2)).type
        'cpu'
    """
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _slots(module: nn.Module, hook: Any) -> Iterator[tuple[nn.Module, str, Tensor]]:
    """``(owner, name, tensor)`` of every tensor ``hook`` loads for ``module``."""
    owners = module.named_modules() if getattr(hook, "place_submodules", False) else [("", module)]
    for prefix, owner in owners:
        tensors = list(owner._parameters.items())
        if getattr(hook, "offload_buffers", False):
            persistent = [n for n in owner._buffers if n not in owner._non_persistent_buffers_set]
            tensors += [(n, owner._buffers[n]) for n in persistent]
        for name, t in tensors:
            if isinstance(t, Tensor) and t.device.type == "meta":
                yield owner, f"{prefix}.{name}" if prefix else name, t


def _put(owner: nn.Module, name: str, value: Tensor | None) -> None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in owner._parameters:
        owner._parameters[leaf] = value  # type: ignore[assignment]
    else:
        owner._buffers[leaf] = value


@contextmanager
def onloaded(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``model``'s offloaded weights are ordinary tensors on
    their modules' execution devices, and accelerate's hooks only move inputs;
    afterwards the model is exactly as before (the same meta tensors, the same
    hooks). Tied weights stay tied. Holds the model's lock. A model without
    offload is left alone.

    The whole model is in memory meanwhile: the price of per-example gradients
    (``torch.func``) of an offloaded model.

    Example:
        >>> from torch import nn
        >>> with onloaded(nn.Linear(2, 2)) as m:
        ...     m.weight.shape
        torch.Size([2, 2])
    """
    with model_lock(model):
        changed: list[tuple[Any, list[tuple[nn.Module, str, Tensor]]]] = []
        loaded: dict[int, Tensor] = {}  # one copy per tensor object: ties stay ties
        try:
            for module in model.modules():
                for hook in _offload_hooks(module):
                    slots = list(_slots(module, hook))
                    changed.append((hook, slots))
                    hook.offload = False
                    dev = hook.execution_device
                    for owner, name, old in slots:
                        new = loaded.get(id(old))
                        if new is None:
                            value = hook.weights_map[name].to(
                                device=dev if dev is not None else "cpu", dtype=old.dtype
                            )
                            if isinstance(old, nn.Parameter):
                                value = nn.Parameter(value, requires_grad=old.requires_grad)
                            new = loaded[id(old)] = value
                        _put(owner, name, new)
            yield model
        finally:
            for hook, slots in reversed(changed):
                for owner, name, old in slots:
                    _put(owner, name, old)
                hook.offload = True


def state_items(
    model: nn.Module, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of ``model.state_dict()`` in name order, each offloaded
    tensor loaded from accelerate's weights map onto ``device`` one at a time
    (bounded memory), the others as they are.

    Example:
        >>> from torch import nn
        >>> [tuple(t.shape) for _, t in state_items(nn.Linear(2, 3))]
        [(3,), (3, 2)]
    """
    sd = model.state_dict(keep_vars=True)
    for name in sorted(sd):
        t = sd[name]
        if t.device.type == "meta":
            path, _, leaf = name.rpartition(".")
            owner = model.get_submodule(path) if path else model
            for hook in _offload_hooks(owner):
                try:
                    t = hook.weights_map[leaf].to(device=device, dtype=t.dtype)
                except KeyError:
                    continue
                break
        yield name, t
