"""One forward pass with caching and interventions, through module hooks.

:class:`HookSession` registers PyTorch hooks on the modules an adapter names,
for exactly the sites a run asks for, and removes them afterwards. The model's
own forward runs unchanged: attrlab never re-derives it. Hooks that only read
return nothing, so a run with an empty cache request is the model's own
computation. The hooks act only in the thread that installed them (a forward of
the same model in another thread meanwhile is the model's own); attrlab's own
runs on one model take turns anyway (:mod:`attrlab.model.lock`).

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("llama"))
    >>> logits, cache = lm.run("a b c", cache=["blocks.0.attn.z"])
    >>> tuple(cache["blocks.0.attn.z"].shape)
    (1, 3, 4, 8)
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import SiteNotExposedError, UnsupportedArchitectureError
from . import interventions as iv_mod
from .adapters.base import Adapter
from .interventions import Intervention
from .sites import Site

HEAD_AXIS = {
    "attn.q_in": 2,
    "attn.k_in": 2,
    "attn.v_in": 2,
    "attn.q": 2,
    "attn.k": 2,
    "attn.v": 2,
    "attn.z": 2,
    "attn.head_out": 2,
}


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out: Any, new: Tensor) -> Any:
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _straight_through(live: Tensor, derived: Tensor) -> Tensor:
    """``live`` unchanged in value, but gradients also reach ``derived``
    (whose sum over the extra head axis equals part of ``live``)."""
    return live + (derived - derived.detach())


class HookSession:
    """Hooks for one run. Use as a context manager around the model call."""

    def __init__(
        self,
        adapter: Adapter,
        cache_sites: Iterable[Site],
        interventions: Iterable[tuple[Site, Intervention]],
        grad: bool,
        start_layer: int | None = None,
        start_resid: Tensor | None = None,
        last_only: bool = False,
        logit_columns: Tensor | None = None,
    ):
        self.a = adapter
        self.logit_columns = logit_columns
        self.cfg = adapter.cfg
        self.grad = grad
        self.cache: dict[str, Tensor] = {}
        self.want: set[str] = {s.name for s in cache_sites}
        self.ivs: dict[str, list[Intervention]] = defaultdict(list)
        for site, iv in interventions:
            self.ivs[site.name].append(iv)
        self.start_layer = start_layer
        self.start_resid = start_resid
        self.last_only = last_only
        self._handles: list[RemovableHandle] = []
        self._saved_forwards: list[tuple[nn.Module, Any]] = []
        self._block_tuple = False  # set in _install when blocks are skipped
        # values shared between hooks of one layer within a forward
        self._z: dict[int, Tensor] = {}
        self._resid_pre: dict[int, Tensor] = {}
        self._attn_in: dict[int, Tensor] = {}  # input of the pre-attention norm
        self._mlp_in: dict[int, Tensor] = {}  # input of a norm the MLP shares with attention
        self._qkv_w: dict[int, dict[str, tuple[Tensor, Tensor | None]]] = {}
        self._owner: int | None = None  # the thread whose forwards the hooks act on
        # a model split across devices (device_map): cached values live on the
        # input device; what a hook writes goes to the device of the module reading it
        self.home = adapter.input_device()
        # mixture-of-experts MLPs: input shape, experts' call, shared expert (output, gate)
        self._moe_shape: dict[int, tuple[int, int]] = {}
        self._moe_call: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._moe_shared: dict[int, dict[str, Tensor]] = {}

    # ------------------------------------------------------------- helpers
    def _needs(self, name: str) -> bool:
        return name in self.want or name in self.ivs

    def _process(self, name: str, x: Tensor, head_axis: int | None = None) -> Tensor:
        """Apply the interventions on ``name`` to ``x``; cache the result."""
        ivs = self.ivs.get(name)
        if ivs:
            x = iv_mod.apply(ivs, x, head_axis)
        if name in self.want:
            if x.device != self.home and not self.grad:  # a layer on another device
                self.cache[name] = x.detach().to(self.home)
                return x
            # under grad the cache is the live graph node itself, on its layer's device
            self.cache[name] = x if self.grad else x.detach()
        return x

    def _add(self, module: nn.Module, kind: str, fn: Any) -> None:
        owner = self._owner

        def scoped(*args: Any) -> Any:
            # another thread's forward of this model: leave it alone
            return fn(*args) if threading.get_ident() == owner else None

        if kind == "pre":
            h = module.register_forward_pre_hook(scoped, with_kwargs=True)
        else:
            h = module.register_forward_hook(scoped, with_kwargs=True)
        self._handles.append(h)

    # -------------------------------------------------------------- install
    def __enter__(self) -> HookSession:
        self._owner = threading.get_ident()
        try:
            self._install()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, fwd in self._saved_forwards:
            if fwd is None:
                del module.forward
            else:
                module.forward = fwd
        self._saved_forwards.clear()

    def _install(self) -> None:
        a = self.a
        # skipped blocks must return what the model expects; probe it (one
        # one-token forward, cached) before any hook is installed
        self._block_tuple = bool(self.start_layer) and a.block_returns_tuple()
        if self._needs("embed"):
            self._add(
                a.token_embedding(), "fwd", self._global_out_hook("embed", a.embedding_multiplier)
            )
        for layer in range(self.cfg.n_layers):
            self._install_block(layer)
        norm = a.final_norm()
        if self._needs("final_norm.input") or "final_norm.scale" in self.want:
            self._add(norm, "pre", self._final_norm_pre)
        if self._needs("final_norm.output"):
            self._add(norm, "fwd", self._final_norm_out)
        if self.last_only:
            self._add(a.unembed(), "pre", self._last_only_pre)
        if self.logit_columns is not None and not self._needs("unembed"):
            self._columns_only(a.unembed(), self.logit_columns)
        if self._needs("unembed"):
            self._add(a.unembed(), "fwd", self._global_out_hook("unembed", a.logit_multiplier))

    def _install_block(self, layer: int) -> None:
        a, p = self.a, f"blocks.{layer}."
        block = a.block(layer)
        if self.start_layer is not None and layer < self.start_layer:
            self._skip_block(block)
            return
        need_mid = self._needs(p + "resid_mid")
        if need_mid and self.cfg.parallel_residual:
            raise SiteNotExposedError(
                f"{p}resid_mid does not exist: this model uses a parallel residual "
                "(attention and MLP both read resid_pre)"
            )
        if (
            self._needs(p + "resid_pre")
            or need_mid
            or (self.start_layer is not None and layer == self.start_layer)
        ):
            self._add(block, "pre", self._resid_pre_hook(layer))
        if self._needs(p + "resid_post"):
            self._add(block, "fwd", self._resid_post_hook(layer))
        head_inputs = any(self._needs(p + f"attn.{c}_in") for c in "qkv")
        if head_inputs:
            self._add(a.attn_in_norm(layer), "pre", self._attn_in_hook(layer))
        if head_inputs or any(self._needs(p + f"attn.{c}") for c in "qkv"):
            for key, mod in a.qkv_modules(layer).items():
                self._add(mod, "fwd", self._qkv_hook(layer, key))
        need_head_out = self._needs(p + "attn.head_out")
        if self._needs(p + "attn.z") or need_head_out:
            self._add(a.o_proj(layer), "pre", self._z_hook(layer))
        if self._needs(p + "attn.pattern"):
            self._add(a.attn(layer), "fwd", self._pattern_hook(layer))
        if self._needs(p + "attn.out") or need_head_out or need_mid:
            out_norm = a.attn_out_norm(layer)
            target = out_norm if out_norm is not None else a.attn_out_module(layer)
            self._add(target, "fwd", self._attn_out_hook(layer, out_norm is not None))
        if self._needs(p + "mlp.in"):
            if a.mlp_shares_attn_norm(layer):
                self._add(a.mlp_in_norm(layer), "pre", self._shared_norm_in_hook(layer))
                self._add(a.mlp(layer), "pre", self._shared_mlp_in_hook(layer))
            else:
                self._add(a.mlp_in_norm(layer), "pre", self._mlp_in_hook(p + "mlp.in"))
        if self._needs(p + "mlp.normed"):
            self._add(a.mlp(layer), "pre", self._mlp_in_hook(p + "mlp.normed"))
        if self._needs(p + "mlp.neurons"):
            self._add(a.down_proj(layer), "pre", self._neurons_hook(layer))
        if self._needs(p + "mlp.router") or self._needs(p + "mlp.experts"):
            self._install_moe(layer)  # before mlp.out's hook: that one sees the change
        if self._needs(p + "mlp.out"):
            out_norm = a.mlp_out_norm(layer)
            target = out_norm if out_norm is not None else a.mlp(layer)
            self._add(target, "fwd", self._global_out_hook(p + "mlp.out", a.residual_multiplier))

    def _install_moe(self, layer: int) -> None:
        """Hooks for ``mlp.router`` / ``mlp.experts`` of a mixture-of-experts MLP."""
        a, p = self.a, f"blocks.{layer}."
        experts, router = a.experts(layer), a.router(layer)
        if experts is None or router is None:
            raise SiteNotExposedError(
                f"{p}mlp.router / {p}mlp.experts do not exist: block {layer}'s MLP is not a "
                f"mixture of experts (family {self.cfg.family!r})"
            )
        if a.mlp_out_norm(layer) is not None or a.residual_multiplier != 1.0:
            raise UnsupportedArchitectureError(
                f"{p}mlp.experts: a norm or multiplier after the MLP is not supported"
            )
        mlp = a.mlp(layer)

        def shape(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = self._get_hidden(args, kwargs)
            self._moe_shape[layer] = (int(x.shape[0]), int(x.shape[1]))

        self._add(mlp, "pre", shape)
        if self._needs(p + "mlp.router"):
            self._add(router, "fwd", self._router_hook(layer))
        if not self._needs(p + "mlp.experts"):
            return

        def call(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            got = [*args, *(kwargs[n] for n in names[len(args) :])]
            self._moe_call[layer] = (got[0], got[1], got[2])

        self._add(experts, "fwd", call)
        shared = a.shared_expert(layer)
        if shared is not None:
            store = self._moe_shared.setdefault(layer, {})
            for key, mod in zip(("out", "gate"), shared):
                if mod is not None:
                    self._add(mod, "fwd", self._store_hook(store, key))
        self._add(mlp, "fwd", self._experts_hook(layer))

    @staticmethod
    def _store_hook(store: dict[str, Tensor], key: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            store[key] = _first(out)

        return hook

    def _router_hook(self, layer: int) -> Any:
        """``mlp.router``: the router's logits as ``[batch, pos, expert]``; when
        written (or read under grad, so that their gradient reaches the routing
        weights) the weights and the choice of experts are recomputed from them
        with the family's routing formula."""
        name = f"blocks.{layer}.mlp.router"

        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            logits = out[0]
            b, n_pos = self._moe_shape[layer]
            site = logits.reshape(b, n_pos, -1)
            new = self._process(name, site, 2)
            if new is site and not self.grad:
                return None
            flat = new.reshape(logits.shape).to(logits.dtype)
            return (flat, *self.a.route(layer, flat), *out[3:])

        return hook

    def _experts_hook(self, layer: int) -> Any:
        """``mlp.experts`` ``[batch, pos, expert (+ shared), d_model]``: each expert's
        routing-weighted output (the experts module's own forward, one token and
        expert per row), plus the shared expert's gated output; a write adds its
        change to the MLP's output. Read under grad, it is built from detached
        inputs and reaches the output by a straight-through path."""
        name = f"blocks.{layer}.mlp.experts"

        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            x, index, weights = self._moe_call.pop(layer)
            shared = self._moe_shared.get(layer, {})
            plain = self.grad and not self.ivs.get(name)
            if plain:
                x, weights = x.detach(), weights.detach()
            parts = [self.a.expert_outputs(layer, x, index, weights)]
            if "out" in shared:
                s, g = shared.pop("out"), shared.pop("gate", None)
                if plain:
                    s, g = s.detach(), None if g is None else g.detach()
                parts.append(self.a.shared_output(layer, s, g)[:, None].to(parts[0].dtype))
            b, n_pos = self._moe_shape[layer]
            experts = torch.cat(parts, 1).reshape(b, n_pos, -1, x.shape[-1])
            new = self._process(name, experts, 2)
            y = _first(out)
            if new is not experts:
                y = y + (new - experts).sum(2).to(y.dtype)
            elif plain:
                y = _straight_through(y, new.sum(2).to(y.dtype))
            else:
                return None
            return _replace_first(out, y)

        return hook

    def _skip_block(self, block: nn.Module) -> None:
        """Make ``block`` return its input: the run starts at a later layer."""
        as_tuple, owner, own = self._block_tuple, self._owner, block.forward
        self._saved_forwards.append((block, block.__dict__.get("forward")))

        def passthrough(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != owner:
                return own(hidden_states, *args, **kwargs)
            return (hidden_states,) if as_tuple else hidden_states

        block.forward = passthrough

    def _columns_only(self, unembed: nn.Module, cols: Tensor) -> None:
        """Make a plain linear unembedding compute the vocabulary columns
        ``cols`` only, the others zero (a target that reads a few logits: the
        full projection is the largest matrix of a one-position forward). Left
        alone for any other module, or one whose weights accelerate manages."""
        if type(unembed) is not nn.Linear or hasattr(unembed, "_hf_hook"):
            return
        owner, own = self._owner, unembed.forward
        self._saved_forwards.append((unembed, unembed.__dict__.get("forward")))
        idx = cols.to(unembed.weight.device)
        w = unembed.weight[idx]
        b = None if unembed.bias is None else unembed.bias[idx]

        def columns(x: Tensor) -> Tensor:
            if threading.get_ident() != owner:
                return own(x)
            y = torch.nn.functional.linear(x, w, b)
            out = y.new_zeros(*y.shape[:-1], unembed.out_features)
            return out.index_copy(-1, idx, y)

        unembed.forward = columns  # type: ignore[method-assign,assignment]

    # ---------------------------------------------------------------- hooks
    def _global_out_hook(self, name: str, factor: float = 1.0) -> Any:
        """The module's output is the site, or, with ``factor``, the output times
        the constant the model applies to it outside the module (Granite's and
        Cohere's multipliers): the site holds the scaled value."""

        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            x = _first(out)
            site = x if factor == 1.0 else x * factor
            new = self._process(name, site)
            if factor == 1.0:
                return None if new is x else _replace_first(out, new)
            return _replace_first(out, self._unscale(x, site, new, factor))

        return hook

    def _unscale(self, x: Tensor, site: Tensor, new: Tensor, factor: float) -> Tensor:
        """What the module returns for a site ``site = x * factor`` that became
        ``new``: ``new / factor``, or ``x`` itself (its gradient through the site
        only, in grad mode) when nothing wrote it. ``site`` already depends on
        ``x``: a gradient through both would reach ``x`` twice."""
        if new is not site:
            return new / factor
        return _straight_through(x.detach(), site / factor) if self.grad else x

    @staticmethod
    def _get_hidden(args: tuple, kwargs: dict) -> Tensor:
        return args[0] if args else kwargs["hidden_states"]

    @staticmethod
    def _set_hidden(args: tuple, kwargs: dict, new: Tensor) -> tuple[tuple, dict]:
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    def _resid_pre_hook(self, layer: int) -> Any:
        name = f"blocks.{layer}.resid_pre"

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            x = orig = self._get_hidden(args, kwargs)
            if self.start_layer == layer and self.start_resid is not None:
                x = self.start_resid.to(device=x.device, dtype=x.dtype).expand_as(x)
            x = self._process(name, x)
            self._resid_pre[layer] = x
            return None if x is orig else self._set_hidden(args, kwargs, x)

        return hook

    def _resid_post_hook(self, layer: int) -> Any:
        return self._global_out_hook(f"blocks.{layer}.resid_post")

    def _qkv_hook(self, layer: int, key: str) -> Any:
        p = f"blocks.{layer}.attn."

        def hook(module: nn.Module, args: Any, kwargs: Any, out: Tensor) -> Any:
            if key == "qkv":
                q, k, v = self.a.split_qkv(out)
                q = self._process(p + "q", self._head_inputs(layer, "q", q), 2)
                k = self._process(p + "k", self._head_inputs(layer, "k", k), 2)
                v = self._process(p + "v", self._head_inputs(layer, "v", v), 2)
                return self.a.merge_qkv(q, k, v)
            per_head = out.unflatten(-1, (-1, self.cfg.d_head))
            per_head = self._head_inputs(layer, key, per_head)
            new = self._process(p + key, per_head, 2)
            return new.flatten(-2)

        return hook

    def _attn_in_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._attn_in[layer] = self._get_hidden(args, kwargs)

        return hook

    def _head_inputs(self, layer: int, c: str, values: Tensor) -> Tensor:
        """The ``attn.{c}`` values ``[b, p, heads, d_head]`` recomputed from the
        per-head inputs of site ``attn.{c}_in`` when a run writes that site (or
        reads it under grad, so that its gradient is each head's own path);
        otherwise ``values`` unchanged."""
        name = f"blocks.{layer}.attn.{c}_in"
        if not self._needs(name):
            return values
        x = self._attn_in[layer]  # [b, p, d_model]
        per_head = x.unsqueeze(2).expand(-1, -1, values.shape[2], -1)
        new = self._process(name, per_head, 2)
        if new is per_head and not self.grad:
            return values  # read only: the model's own projection
        if layer not in self._qkv_w:
            self._qkv_w[layer] = self.a.qkv_weights(layer)
        w, b = self._qkv_w[layer][c]  # [d_model, heads, d_head], [heads, d_head]
        normed = self.a.attn_in_norm(layer).forward(new)  # the module's own norm, no hooks
        out = torch.einsum("bphd,dhe->bphe", normed, w.to(normed.device, normed.dtype))
        if b is not None:
            out = out + b.to(out.device, out.dtype)
        return out.to(values.dtype)

    def _shared_norm_in_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._mlp_in[layer] = self._get_hidden(args, kwargs)

        return hook

    def _shared_mlp_in_hook(self, layer: int) -> Any:
        """``mlp.in`` of a block whose MLP reads the pre-attention norm's output:
        the norm's input, and the MLP's input recomputed from it through the norm
        module's own forward (no hooks), so that writing it (or its gradient)
        concerns the MLP alone."""
        name = f"blocks.{layer}.mlp.in"
        norm = self.a.mlp_in_norm(layer)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            x = self._mlp_in[layer]
            own = x.view_as(x) if self.grad else x
            new = self._process(name, own)
            if new is x:
                return None
            return self._set_hidden(args, kwargs, norm.forward(new))

        return hook

    def _mlp_in_hook(self, name: str) -> Any:
        """``mlp.in`` (the MLP norm's input) or ``mlp.normed`` (the MLP's own input)."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            x = self._get_hidden(args, kwargs)
            # the MLP's own copy: its gradient is the MLP path only, and writing it
            # leaves the residual stream alone
            own = x.view_as(x) if self.grad else x
            new = self._process(name, own)
            return None if new is x else self._set_hidden(args, kwargs, new)

        return hook

    def _z_hook(self, layer: int) -> Any:
        name = f"blocks.{layer}.attn.z"

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            z = args[0].unflatten(-1, (self.cfg.n_heads, self.cfg.d_head))
            z = self._process(name, z, 2)
            self._z[layer] = z
            return (z.flatten(-2), *args[1:]), kwargs

        return hook

    def _pattern_hook(self, layer: int) -> Any:
        name = f"blocks.{layer}.attn.pattern"

        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if weights is None:
                raise SiteNotExposedError(
                    f"{name} is not exposed by this attention implementation "
                    f"({getattr(self.a.hf_config, '_attn_implementation', '?')}); load the model "
                    "with attn_implementation='eager' (al.load(..., attn_implementation='eager'))"
                )
            self._process(name, weights)
            return None

        return hook

    def _head_out(
        self,
        layer: int,
        out_norm_input: Tensor | None,
        norm: nn.Module | None,
        detach: bool = False,
    ) -> Tensor:
        """Per-head contribution to the residual, ``[batch, pos, head, d_model]``.

        ``detach``: build it from detached inputs (a read-only cache under grad:
        it then gets its gradient by a straight-through path, and ``z`` is not
        reached twice)."""
        z = self._z[layer]  # [b, p, h, dh]
        if detach:
            z = z.detach()
            out_norm_input = None if out_norm_input is None else out_norm_input.detach()
        W_O = self.a.W_O(layer)  # [h, dh, d_model]
        head_out = torch.einsum("bphd,hdm->bphm", z, W_O.to(z.device, z.dtype))
        if norm is not None and out_norm_input is not None:
            # post-attention norm (Gemma 2/3): freeze its scale, it is then linear
            scale = self.a.norm_scale(norm, out_norm_input)  # [b, p, 1]
            w, _ = self.a.norm_affine(norm)
            head_out = head_out * (scale * w.to(scale.device)).unsqueeze(2).to(head_out)
        return head_out

    def _attn_out_hook(self, layer: int, is_norm: bool) -> Any:
        p = f"blocks.{layer}."
        factor = self.a.residual_multiplier  # Granite: the residual receives factor * out

        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            raw = _first(out)
            x = orig = raw if factor == 1.0 else raw * factor
            if self._needs(p + "attn.head_out"):
                norm_in = self._get_hidden(args, kwargs) if is_norm else None
                plain = self.grad and not self.ivs.get(p + "attn.head_out")
                head_out = self._head_out(layer, norm_in, module if is_norm else None, plain)
                new_head_out = self._process(p + "attn.head_out", head_out, 2)
                if new_head_out is not head_out:
                    x = x + (new_head_out - head_out).sum(2)
                elif plain:  # a read-only cache built from detached inputs
                    x = _straight_through(x, new_head_out.sum(2))
            x = self._process(p + "attn.out", x)
            if self._needs(p + "resid_mid"):
                resid_pre = self._resid_pre[layer].to(x.device)  # the block's input device
                mid = resid_pre + x
                if self.grad and not self.ivs.get(p + "resid_mid"):
                    # read-only cache: a leaf fed by the straight-through path below,
                    # so resid_pre and attn.out are not reached twice
                    mid = mid.detach().requires_grad_(True)
                new_mid = self._process(p + "resid_mid", mid)
                if new_mid is not mid:
                    x = new_mid - resid_pre
                elif self.grad:
                    x = _straight_through(x, new_mid)
            if factor != 1.0:
                return _replace_first(out, self._unscale(raw, orig, x, factor))
            return None if x is orig else _replace_first(out, x)

        return hook

    def _neurons_hook(self, layer: int) -> Any:
        name = f"blocks.{layer}.mlp.neurons"

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            x = orig = args[0]
            x = self._process(name, x)
            return None if x is orig else ((x, *args[1:]), kwargs)

        return hook

    def _final_norm_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        x = orig = self._get_hidden(args, kwargs)
        x = self._process("final_norm.input", x)
        if "final_norm.scale" in self.want:
            self.cache["final_norm.scale"] = self.a.norm_scale(module, x).detach().to(self.home)
        return None if x is orig else self._set_hidden(args, kwargs, x)

    def _final_norm_out(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
        x = orig = _first(out)
        x = self._process("final_norm.output", x)
        return None if x is orig else _replace_first(out, x)

    def _last_only_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Unembed the last position only (saves the vocabulary projection)."""
        x = self._get_hidden(args, kwargs)
        return self._set_hidden(args, kwargs, x[:, -1:])
