"""Hook points for sites that are not one module's plain input and output.

Sites are read and written with module hooks: a pre-hook on a module sees its
input, a forward hook its output. A few families compute a site without a
module of its own, or in a module that does more, or hand the value on in a
way that hooks must not see:

- an MLP written out in the block (OPT: ``fc1`` -> activation -> ``fc2``), or
  an MLP module that adds the residual itself (BLOOM): the site's input is the
  first module's input, its output the last module's output;
- a block that flattens ``[batch, pos]`` into one axis before its MLP (OPT):
  with ``block=`` the hooks still see ``[batch, pos, ...]`` tensors;
- a block that adds attention's output into the MLP's output *in place*
  (Falcon's parallel blocks): with ``copy_out=True`` the block gets a copy of
  the hooked output, so a cached ``mlp.out`` keeps the MLP's own value;
- a token embedding followed by a projection (OPT's ``project_in``), an
  unembedding preceded by one (``project_out``).

:class:`Chain` stands for such a computation. Its ``forward`` calls the real
modules in turn (the model's own numerics), its ``register_forward_pre_hook``
puts the hook on the first module and its ``register_forward_hook`` on the
last. It is not registered in the model: the parameters keep one owner, and
``model.modules()`` never lists it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> up, down = nn.Linear(4, 8), nn.Linear(8, 4)
    >>> mlp = Chain(up, nn.ReLU(), down)
    >>> seen = []
    >>> h = mlp.register_forward_hook(lambda m, a, k, out: seen.append(out.shape), with_kwargs=True)
    >>> _ = down(torch.relu(up(torch.ones(2, 4))))  # the model's own calls fire it
    >>> h.remove(); seen
    [torch.Size([2, 4])]
"""

from __future__ import annotations

import threading
from typing import Any

from torch import Tensor, nn


class _Handles:
    """Removes several hook handles at once (what ``register_*_hook`` returns)."""

    def __init__(self, handles: list[Any]):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Chain(nn.Module):
    """Modules called in turn, hooked as one module (see the module docstring).

    Args:
        modules: the real modules, in the order the model calls them.
        block: the decoder block that flattens ``[batch, pos]`` before calling
            them (OPT): hooks see (and return) ``[batch, pos, ...]`` tensors.
        copy_out: hand the model a copy of the (hooked) output, because the
            model adds into it in place (Falcon's parallel blocks).
    """

    def __init__(self, *modules: nn.Module, block: nn.Module | None = None, copy_out: bool = False):
        super().__init__()
        # plain attributes, not submodules: the parameters keep their one owner
        self.__dict__["parts"] = tuple(modules)
        self.__dict__["block"] = block
        self.__dict__["copy_out"] = copy_out
        self.__dict__["_local"] = threading.local()

    @property
    def first(self) -> nn.Module:
        return self.__dict__["parts"][0]

    @property
    def last(self) -> nn.Module:
        return self.__dict__["parts"][-1]

    @property
    def weight(self) -> Any:
        """The first module's weight (a token embedding chain: the embedding matrix)."""
        return self.first.weight

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = self.first(*args, **kwargs)
        for m in self.__dict__["parts"][1:]:
            x = m(x)
        return x

    # ---------------------------------------------------------------- shapes
    def _shape_hook(self) -> Any:
        """Record the block input's leading ``[batch, pos]`` shape for this thread."""
        local = self.__dict__["_local"]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            local.shape = tuple(x.shape[:-1]) if isinstance(x, Tensor) else None

        block = self.__dict__["block"]
        return block.register_forward_pre_hook(hook, with_kwargs=True)

    def _unflat(self, t: Any) -> Any:
        shape = getattr(self.__dict__["_local"], "shape", None)
        if (
            isinstance(t, Tensor)
            and shape is not None
            and len(shape) == 2
            and t.dim() == 2
            and t.shape[0] == shape[0] * shape[1]
        ):
            return t.unflatten(0, shape)
        return t

    # ----------------------------------------------------------------- hooks
    def register_forward_pre_hook(  # type: ignore[override]
        self, hook: Any, *, prepend: bool = False, with_kwargs: bool = False
    ) -> Any:
        if self.__dict__["block"] is None:
            return self.first.register_forward_pre_hook(
                hook, prepend=prepend, with_kwargs=with_kwargs
            )

        def pre(module: nn.Module, args: tuple, *rest: Any) -> Any:
            x = args[0]
            xs = self._unflat(x)
            res = hook(module, (xs, *args[1:]), *rest)
            if xs is x:
                return res
            if res is None:  # hand on the hook's view, so that a cached value is in the graph
                res = ((xs, *args[1:]), *rest) if with_kwargs else (xs, *args[1:])
            new_args, new_kwargs = (
                res if with_kwargs else (res if isinstance(res, tuple) else (res,), None)
            )
            new_args = (new_args[0].reshape(x.shape), *new_args[1:])
            return (new_args, new_kwargs) if with_kwargs else new_args

        return _Handles(
            [
                self._shape_hook(),
                self.first.register_forward_pre_hook(pre, prepend=prepend, with_kwargs=with_kwargs),
            ]
        )

    def register_forward_hook(  # type: ignore[override]
        self, hook: Any, *, prepend: bool = False, with_kwargs: bool = False, **kw: Any
    ) -> Any:
        copy_out = self.__dict__["copy_out"]
        flat = self.__dict__["block"] is not None
        if not flat and not copy_out:
            return self.last.register_forward_hook(
                hook, prepend=prepend, with_kwargs=with_kwargs, **kw
            )

        def fwd(module: nn.Module, args: tuple, *rest: Any) -> Any:
            *kwargs, out = rest
            o = self._unflat(out)
            a = (self._unflat(args[0]), *args[1:]) if args else args
            res = hook(module, a, *kwargs, o)
            if res is None and not copy_out and o is out:
                return None
            # otherwise the model continues from the hook's tensor (a cached value is in the graph)
            new = o if res is None else res
            if copy_out:
                new = new.clone()  # the model adds into it in place; the site keeps its value
            return new.reshape(out.shape) if o is not out else new

        handles = [
            self.last.register_forward_hook(fwd, prepend=prepend, with_kwargs=with_kwargs, **kw)
        ]
        if flat:
            handles.insert(0, self._shape_hook())
        return _Handles(handles)


def real_roles(roles: dict[str, list[nn.Module]]) -> dict[str, list[nn.Module]]:
    """``Adapter.relevance_roles`` with each :class:`Chain` replaced by the real
    module relevance rules act on: for the unembedding, the last module (its
    output is the logits); elsewhere the module itself when the chain is one
    module, else nothing (an MLP written out in the block has no module; its
    activation and linear layers get their rules on their own)."""
    out: dict[str, list[nn.Module]] = {}
    for role, mods in roles.items():
        keep: list[nn.Module] = []
        for m in mods:
            if not isinstance(m, Chain):
                keep.append(m)
            elif role == "unembed":
                keep.append(m.last)
            elif len(m.__dict__["parts"]) == 1:
                keep.append(m.first)
        out[role] = keep
    return out
