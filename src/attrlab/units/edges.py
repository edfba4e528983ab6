"""Edge units: the computational graph between model components.

Upstream nodes write to the residual stream: ``embed`` (the residual entering
block 0), every attention head ``a{l}.h{h}`` and every MLP ``m{l}``.
Downstream nodes read it: every head's query, key and value input
``a{l}.h{h}.q|k|v`` (or one input ``a{l}.h{h}`` with ``qkv=False``), every MLP
``m{l}`` and the ``logits`` (the final norm's input). With grouped-query
attention a key/value head is one input shared by several query heads, so its
inputs are their own nodes ``a{l}.kv{g}.k|v`` (``qkv=True`` only). An edge ``u -> v``
exists when ``u`` writes before ``v`` reads: the input of ``v`` is the sum of
the outputs of its upstream nodes (plus constant biases).

Patching an edge means: ``v`` sees ``u``'s reference (counterfactual or mean)
output instead of its actual one, while every other reader of ``u`` is
unchanged. :class:`EdgePatcher` runs a forward pass where every downstream
node gets its own input,

    x_v = x_v(actual) + sum_u (1 - mask[u, v]) * (a_u(reference) - a_u(actual)),

computed from the model's own modules (its pre-attention norm and query / key /
value projections are applied per head). ``mask`` may differ per batch row and
may be a differentiable float tensor (``d metric / d mask[u, v] = -EAP(u, v)``).

Supported: models without post-block norms (GPT-2, GPT-NeoX, Llama, Mistral,
Qwen2, Gemma, Phi-3, with or without grouped-query attention). Edges are
summed over positions unless ``per_position=True``.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> g = al.units.Edges().graph(lm)
    >>> g.upstream[:2], g.downstream[-1], g.n_edges
    (['embed', 'a0.h0'], 'logits', 110)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..model.adapters.base import linear_in_out
from ..model.lock import holds_model_lock, lock_of
from .base import Units, register_units

__all__ = ["EdgeGraph", "EdgePatcher", "Edges", "edge_activations", "input_gradients"]


@dataclass
class EdgeGraph:
    """Nodes and edges of a model's residual graph (see the module docs).

    Attributes:
        upstream: upstream node names ``[U]`` (``embed``, ``a{l}.h{h}``, ``m{l}``).
        n_kv_heads: key/value heads per layer (0: one per query head).
        downstream: downstream node names ``[V]``.
        adjacency: bool ``[U, V]``: ``u -> v`` is an edge.
        up_layer, down_layer: layer of each node (embed: -1, logits: n_layers).
    """

    n_layers: int
    n_heads: int
    qkv: bool
    parallel: bool
    n_pos: int = 0  # > 0: one edge per (u, v, position); 0: edges summed over positions
    n_kv_heads: int = 0  # key/value heads per layer; 0: one per query head
    upstream: list[str] = field(default_factory=list)
    downstream: list[str] = field(default_factory=list)
    adjacency: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))

    @classmethod
    def build(
        cls,
        n_layers: int,
        n_heads: int,
        qkv: bool = True,
        parallel: bool = False,
        n_pos: int = 0,
        n_kv_heads: int = 0,
    ) -> EdgeGraph:
        """The graph of a model with these shapes (``n_kv_heads`` < ``n_heads``:
        grouped-query attention, key/value inputs ``a{l}.kv{g}.k|v``).

        Example:
            >>> EdgeGraph.build(1, 1, qkv=False).downstream
            ['a0.h0', 'm0', 'logits']
            >>> EdgeGraph.build(1, 2, n_kv_heads=1).downstream
            ['a0.h0.q', 'a0.h1.q', 'a0.kv0.k', 'a0.kv0.v', 'm0', 'logits']
        """
        kv = n_kv_heads if 0 < n_kv_heads < n_heads else 0
        if kv and not qkv:
            raise InputError(
                "with grouped-query attention key/value inputs are shared by several query "
                "heads; use separate query/key/value inputs (qkv=True)"
            )
        if kv and n_heads % kv:
            raise InputError(f"{n_heads} query heads do not share {kv} key/value heads evenly")
        g = cls(n_layers, n_heads, qkv, parallel, n_pos, kv)
        up_order: list[float] = [-1.0]  # when each upstream node writes
        g.upstream = ["embed"]
        for layer in range(n_layers):
            for h in range(n_heads):
                g.upstream.append(f"a{layer}.h{h}")
                up_order.append(layer)
            g.upstream.append(f"m{layer}")
            up_order.append(layer + (0.0 if parallel else 0.5))
        down_order: list[float] = []
        for layer in range(n_layers):
            for c in ("q", "k", "v") if qkv else ("",):
                grouped = kv and c != "q"
                for h in range(kv if grouped else n_heads):
                    node = f"a{layer}.kv{h}" if grouped else f"a{layer}.h{h}"
                    g.downstream.append(node + (f".{c}" if c else ""))
                    down_order.append(layer)
            g.downstream.append(f"m{layer}")
            down_order.append(layer + (0.0 if parallel else 0.5))
        g.downstream.append("logits")
        down_order.append(n_layers + 1.0)
        uo = torch.tensor(up_order)
        do = torch.tensor(down_order)
        g.adjacency = uo[:, None] < do[None, :]
        return g

    @property
    def n_base_edges(self) -> int:
        """Edges ``u -> v`` not counting positions."""
        return int(self.adjacency.sum())

    @property
    def n_edges(self) -> int:
        return self.n_base_edges * max(1, self.n_pos)

    def edge_index(self) -> Tensor:
        """``[n_base_edges, 2]`` (upstream, downstream) indices, row-major. Per-position
        edges are ordered edge-major: edge ``e`` at position ``p`` is ``e * n_pos + p``."""
        return self.adjacency.nonzero()

    def labels(self) -> dict[str, list[Any]]:
        idx = self.edge_index()
        ups = [self.upstream[i] for i in idx[:, 0].tolist()]
        downs = [self.downstream[j] for j in idx[:, 1].tolist()]
        if not self.n_pos:
            return {"upstream": ups, "downstream": downs}
        P = self.n_pos
        return {
            "upstream": [u for u in ups for _ in range(P)],
            "downstream": [d for d in downs for _ in range(P)],
            "position": [p for _ in ups for p in range(P)],
        }

    def to_matrix(self, scores: Tensor) -> Tensor:
        """Edge scores ``[..., n_edges]`` -> ``[..., U, V]`` (or ``[..., U, V, n_pos]``
        per position; 0 off the graph)."""
        idx = self.edge_index()
        U, V = len(self.upstream), len(self.downstream)
        if self.n_pos:
            out = torch.zeros(*scores.shape[:-1], U, V, self.n_pos, dtype=scores.dtype)
            out[..., idx[:, 0], idx[:, 1], :] = scores.reshape(
                *scores.shape[:-1], len(idx), self.n_pos
            )
            return out
        out = torch.zeros(*scores.shape[:-1], U, V, dtype=scores.dtype)
        out[..., idx[:, 0], idx[:, 1]] = scores
        return out

    def from_matrix(self, m: Tensor) -> Tensor:
        """``[..., U, V]`` (or ``[..., U, V, n_pos]``) -> ``[..., n_edges]``."""
        idx = self.edge_index()
        if self.n_pos:
            x = m[..., idx[:, 0], idx[:, 1], :]
            return x.reshape(*x.shape[:-2], -1)
        return m[..., idx[:, 0], idx[:, 1]]

    @property
    def head_inputs(self) -> tuple[int, int, int]:
        """Downstream attention inputs per layer for (q, k, v) (``(H, 0, 0)``
        with ``qkv=False``)."""
        if not self.qkv:
            return (self.n_heads, 0, 0)
        kv = self.n_kv_heads or self.n_heads
        return (self.n_heads, kv, kv)

    def down_slices(self) -> dict[str, Any]:
        """Index ranges of each layer's downstream nodes (attention, MLP) and logits."""
        per = sum(self.head_inputs) + 1
        return {"per_layer": per, "logits": self.n_layers * per}

    def up_index(self, layer: int) -> tuple[int, int]:
        """``(first head index, mlp index)`` of a layer in :attr:`upstream`."""
        start = 1 + layer * (self.n_heads + 1)
        return start, start + self.n_heads


@register_units("edges")
class Edges(Units):
    """Edges of the residual graph (see the module docs).

    Args:
        qkv: separate query, key and value inputs per head (default) or one
            input per head (not for grouped-query models, whose key/value
            inputs ``a{l}.kv{g}.k|v`` are shared by several heads).
        per_position: one edge per ``(u, v, position)`` (the residual stream is
            position-wise, so ``u`` at position ``p`` feeds ``v``'s input at ``p``)
            instead of summing over positions.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> al.units.Edges(qkv=False).graph(lm).n_edges
        54
    """

    def __init__(self, qkv: bool = True, per_position: bool = False):
        self.qkv = qkv
        self.per_position = per_position

    def graph(self, lm: Any, n_pos: int | None = None) -> EdgeGraph:
        """The :class:`EdgeGraph` of ``lm`` (checks the architecture is supported);
        per-position edges need the prompt length ``n_pos``."""
        check_supported(lm)
        c = lm.cfg
        if self.per_position and not n_pos:
            raise InputError("per-position edges need the prompt length (n_pos=)")
        return EdgeGraph.build(
            c.n_layers,
            c.n_heads,
            self.qkv,
            c.parallel_residual,
            int(n_pos or 0) if self.per_position else 0,
            c.n_kv_heads,
        )

    def mask_values(self, lm: Any, inputs: Any, target: Any, masks: Any, **context: Any) -> Tensor:
        """Target with only the edges in each mask kept (others patched to the
        ``counterfactual=`` given in ``context``); ``masks`` bool ``[n, n_edges]``."""
        from ..targets import resolve

        cf = context.get("counterfactual")
        if cf is None:
            raise InputError("edge masks need counterfactual= (the patched-in values)")
        t = resolve(target, lm)
        batch = t.prepare(lm, lm.tokenize(inputs))
        g = self.graph(lm, n_pos=batch.shape[1])
        cfb = t.prepare(lm, lm.tokenize(cf))
        ref = edge_activations(lm, cfb, g)
        out = []
        for m in torch.as_tensor(masks).bool():
            with torch.no_grad(), EdgePatcher(lm, g, ref, g.to_matrix(m.float())[None]):
                logits, _ = lm.run(batch)
            out.append(t(logits, batch).float().mean())
        return torch.stack(out)


def check_supported(lm: Any) -> None:
    """Raise :class:`InputError` for architectures edges do not support yet."""
    c = lm.cfg
    if c.post_block_norms:
        raise InputError(
            f"edge units need each component's output to add linearly to the residual; "
            f"{c.family} normalizes attention/MLP outputs before adding them (not supported)"
        )


# ------------------------------------------------------------------ helpers
def _attn_in_norm(lm: Any, layer: int) -> nn.Module:
    a = lm.adapter
    norm = a.sub(layer, a.attn_in_norm_name)
    assert norm is not None
    return norm


def _proj_weights(
    lm: Any, layer: int
) -> list[tuple[nn.Module, str, list[Tensor], Tensor, Tensor | None]]:
    """Per projection module: (module, component(s), column indices (one
    ``[heads, dh]`` per component: query heads for q, key/value heads for k, v),
    weight ``[d_in, d_out]``, bias)."""
    a = lm.adapter
    out = []
    for key, mod in a.qkv_modules(layer).items():
        w, b = linear_in_out(mod)
        cols = torch.arange(w.shape[1])
        if key == "qkv":
            parts = a.split_qkv(cols[None, None].float())
            idx = [t[0, 0].round().long() for t in parts]  # q [H, dh], k / v [K, dh]
        else:
            idx = [cols.reshape(-1, lm.cfg.d_head)]
        out.append((mod, key, idx, w, b))
    return out


def _head_weights(lm: Any, layer: int) -> dict[str, Tensor]:
    """``{"q"|"k"|"v": W [d_model, heads, d_head]}`` of one layer (k, v: key/value heads)."""
    res = {}
    for _, key, idx, w, _ in _proj_weights(lm, layer):
        comps = ("q", "k", "v") if key == "qkv" else (key,)
        for i, c in enumerate(comps):
            res[c] = w[:, idx[i]]  # [d, H, dh]
    return res


@contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _upstream_sites(n_layers: int) -> list[str]:
    sites = ["blocks.0.resid_pre"] + [f"blocks.{i}.attn.head_out" for i in range(n_layers)]
    return sites + [f"blocks.{i}.mlp.out" for i in range(n_layers)]


def _stack_upstream(cache: Any, n_layers: int) -> Tensor:
    parts = [cache["blocks.0.resid_pre"][None]]
    for i in range(n_layers):
        parts.append(cache[f"blocks.{i}.attn.head_out"].permute(2, 0, 1, 3))
        parts.append(cache[f"blocks.{i}.mlp.out"][None])
    return torch.cat(parts)


def edge_activations(
    lm: Any,
    batch: Any,
    graph: EdgeGraph,
    grad: bool = False,
    return_logits: bool = False,
    last_only: bool = False,
) -> Any:
    """Upstream node outputs ``[U, batch, pos, d_model]`` of a run (no interventions);
    with ``return_logits``, ``(outputs, logits)``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> edge_activations(lm, lm.tokenize("a b"), g).shape
        torch.Size([11, 1, 2, 32])
    """
    L = graph.n_layers
    with torch.set_grad_enabled(grad):
        logits, cache = lm.run(batch, cache=_upstream_sites(L), grad=grad, last_only=last_only)
    act = _stack_upstream(cache, L)
    return (act, logits) if return_logits else act


def _norm_vjp(norm: nn.Module, x: Tensor, cot: Tensor) -> Tensor:
    """VJP of ``norm`` at ``x`` ``[b, p, d]`` for cotangents ``[n, b, p, d]``."""
    xr = x.detach()[None].expand_as(cot).clone().requires_grad_(True)
    with torch.enable_grad():
        y = norm(xr)
        (g,) = torch.autograd.grad(y, xr, grad_outputs=cot.to(y.dtype))
    return g


@holds_model_lock
def input_gradients(
    lm: Any,
    batch: Any,
    graph: EdgeGraph,
    metric_fn: Any,
    interventions: Sequence[Any] = (),
    last_only: bool = False,
    with_activations: bool = False,
) -> Any:
    """Gradient of the metric w.r.t. each downstream node's input (through that
    node only) ``[V, batch, pos, d_model]``, from one forward and one backward.

    ``metric_fn(logits, batch) -> [batch]`` (summed for the backward). Head
    inputs: the gradients at the head's (pre-rotary) q/k/v projections are
    pulled back through the projection columns of that head and the
    pre-attention norm (a batched vector-Jacobian product, exact). MLP inputs:
    the gradient at the MLP's norm output pulled back through that norm.

    Returns ``(grads, metric values [batch])``, and the run's upstream outputs
    ``[U, batch, pos, d_model]`` as a third item with ``with_activations``.
    ``last_only``: the metric reads the last position only (cheaper unembedding).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> t = al.targets.resolve(" a", lm)
        >>> grads, m = input_gradients(lm, lm.tokenize("a b"), g, t)
        >>> grads.shape
        torch.Size([27, 1, 2, 32])
    """
    L = graph.n_layers
    a = lm.adapter
    captured: dict[str, Tensor] = {}
    handles = []
    for layer in range(L):

        def pre_attn(mod: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
            captured[f"x_attn{layer}"] = args[0] if args else kwargs["hidden_states"]

        def pre_mlp(mod: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
            captured[f"x_mlp{layer}"] = args[0] if args else kwargs["hidden_states"]

        def post_mlp(
            mod: nn.Module, args: tuple, kwargs: dict, out: Any, layer: int = layer
        ) -> None:
            captured[f"n_mlp{layer}"] = out[0] if isinstance(out, tuple) else out

        handles.append(
            _attn_in_norm(lm, layer).register_forward_pre_hook(pre_attn, with_kwargs=True)
        )
        norm = a.mlp_in_norm(layer)
        handles.append(norm.register_forward_pre_hook(pre_mlp, with_kwargs=True))
        handles.append(norm.register_forward_hook(post_mlp, with_kwargs=True))
    comps = ("q", "k", "v")
    sites = [f"blocks.{i}.attn.{c}" for i in range(L) for c in comps] + ["final_norm.input"]
    extra = _upstream_sites(L) if with_activations else []
    with _hooks(handles), torch.enable_grad():
        logits, cache = lm.run(
            batch,
            cache=sites + extra,
            interventions=list(interventions),
            grad=True,
            last_only=last_only,
        )
        m = metric_fn(logits, cache.batch)
        wrt = [cache[s] for s in sites] + [captured[f"n_mlp{i}"] for i in range(L)]
        grads = torch.autograd.grad(m.sum(), wrt, allow_unused=True)
    g = {s: (torch.zeros_like(cache[s]) if gr is None else gr) for s, gr in zip(sites, grads)}
    g_mlp = [
        torch.zeros_like(captured[f"n_mlp{i}"]) if gr is None else gr
        for i, gr in enumerate(grads[len(sites) :])
    ]
    H = graph.n_heads
    out = []
    for layer in range(L):
        W = _head_weights(lm, layer)
        cots = []
        for c in comps:
            gc = g[f"blocks.{layer}.attn.{c}"].to(W[c].dtype)  # [b, p, H (k, v: K), dh]
            cots.append(torch.einsum("bphe,dhe->hbpd", gc, W[c]))  # [H | K, b, p, d]
        cot = torch.cat(cots)  # [H + 2K, b, p, d]: the layer's downstream q, k, v inputs
        gx = _norm_vjp(_attn_in_norm(lm, layer), captured[f"x_attn{layer}"], cot)
        if not graph.qkv:
            gx = gx.reshape(3, H, *gx.shape[1:]).sum(0)
        out.append(gx)
        gm = _norm_vjp(a.mlp_in_norm(layer), captured[f"x_mlp{layer}"], g_mlp[layer][None])
        out.append(gm)
    out.append(g["final_norm.input"][None])
    if with_activations:
        act = _stack_upstream({s: cache[s].detach() for s in extra}, L)
        return torch.cat(out).detach(), m.detach(), act
    return torch.cat(out).detach(), m.detach()


# ------------------------------------------------------------- edge patcher
class EdgePatcher:
    """Context manager: during ``lm.run`` inside it, every downstream node sees
    its own input with the edges where ``mask`` is 0 patched to ``reference``.

    Args:
        lm: the wrapped model.
        graph: its :class:`EdgeGraph`.
        reference: upstream outputs to patch in ``[U, ref_rows, pos, d_model]``;
            ``ref_rows`` is 1 (broadcast) or divides the run's batch (row ``r``
            uses reference row ``r // (batch / ref_rows)``: prompt-major repeats).
        mask: ``[rows or 1, U, V]`` (or ``[rows or 1, U, V, pos]`` per position)
            float (1 = keep the actual value, 0 = patch); may require grad.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> ref = edge_activations(lm, lm.tokenize("a c"), g)
        >>> keep = torch.ones(1, len(g.upstream), len(g.downstream))
        >>> with EdgePatcher(lm, g, ref, keep):
        ...     same, _ = lm.run("a b")
        >>> bool(torch.allclose(same, lm.run("a b")[0], atol=1e-5))
        True
    """

    def __init__(self, lm: Any, graph: EdgeGraph, reference: Tensor, mask: Tensor):
        check_supported(lm)
        self.lm, self.g = lm, graph
        self.ref = reference
        adj = graph.adjacency.to(mask.dtype)
        if mask.dim() == 4:  # per position [R, U, V, P]
            adj = adj[..., None]
        self.w = (1.0 - mask) * adj  # [R, U, V(, P)] weight of the patch
        self.handles: list[Any] = []
        self.actual: dict[int, Tensor] = {}  # upstream index -> [b, p, d]
        self.normed: dict[int, Tensor] = {}  # layer -> per-input normed [H + 2K | H, b, p, d]
        self._lock: Any = None  # the model's lock, held between __enter__ and __exit__

    # rows of the reference / masks for a run of ``n`` rows
    def _ref_rows(self, n: int) -> Tensor:
        r = self.ref.shape[1]
        if r == n:
            return self.ref
        if n % r:
            raise InputError(f"reference has {r} rows; the run has {n}")
        return self.ref.repeat_interleave(n // r, 1)

    def _weights(self, n: int, cols: slice) -> Tensor:
        w = self.w[:, :, cols]
        if w.shape[0] not in (1, n):
            raise InputError(f"mask has {w.shape[0]} rows; the run has {n}")
        return w

    def _delta(self, n_up: int, cols: slice, like: Tensor) -> Tensor:
        """``[V_cols, b, p, d]`` sum over upstream < n_up of weighted (ref - actual)."""
        n = like.shape[0]
        ref = self._ref_rows(n)[:n_up].to(like.dtype)
        act = torch.stack([self.actual[i] for i in range(n_up)])  # [u, b, p, d]
        diff = ref - act
        w = self._weights(n, cols)[:, :n_up].to(like.dtype)  # [R, u, v(, p)]
        if w.dim() == 4:
            if w.shape[0] == 1:
                return torch.einsum("uvp,ubpd->vbpd", w[0], diff)
            return torch.einsum("buvp,ubpd->vbpd", w, diff)
        if w.shape[0] == 1:
            return torch.einsum("uv,ubpd->vbpd", w[0], diff)
        return torch.einsum("buv,ubpd->vbpd", w, diff)

    def __enter__(self) -> EdgePatcher:
        # the patch hooks are model state: hold the model's lock until __exit__
        self._lock = lock_of(self.lm)
        if self._lock is not None:
            self._lock.acquire()
        try:
            return self._install()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _install(self) -> EdgePatcher:
        lm, g, a = self.lm, self.g, self.lm.adapter
        H = g.n_heads
        n_in = g.head_inputs if g.qkv else (H, H, H)  # normed rows per q, k, v
        start = [0, n_in[0], n_in[0] + n_in[1]]
        per = g.down_slices()["per_layer"]
        for layer in range(g.n_layers):
            first_head, mlp_idx = g.up_index(layer)
            att = slice(layer * per, layer * per + per - 1)
            mlp_col = slice(layer * per + per - 1, layer * per + per)

            def pre_attn(
                mod: nn.Module,
                args: tuple,
                kwargs: dict,
                layer: int = layer,
                first_head: int = first_head,
                att: slice = att,
            ) -> None:
                x = args[0] if args else kwargs["hidden_states"]
                if layer == 0:
                    self.actual[0] = x
                d = self._delta(first_head, att, x)  # [H + 2K | H, b, p, d]
                if not g.qkv:
                    d = d.repeat(3, 1, 1, 1)
                self.normed[layer] = mod.forward(x[None] + d)  # [H + 2K, b, p, d] (no hooks)

            def qkv_out(
                mod: nn.Module, args: tuple, out: Tensor, layer: int = layer, spec: Any = None
            ) -> Tensor:
                key, idx, w, b = spec
                n = self.normed[layer]
                comps = range(3) if key == "qkv" else [("q", "k", "v").index(key)]
                new = out.clone()
                for slot, ci in enumerate(comps):
                    cols = idx[slot]  # [heads, dh]
                    nn_ = n[start[ci] : start[ci] + n_in[ci]].to(w.dtype)  # [heads, b, p, d]
                    val = torch.einsum("hbpd,dhe->bphe", nn_, w[:, cols])
                    if b is not None:
                        val = val + b[cols]
                    new[..., cols.reshape(-1)] = val.reshape(*val.shape[:2], -1).to(out.dtype)
                return new

            def pre_oproj(
                mod: nn.Module, args: tuple, layer: int = layer, first_head: int = first_head
            ) -> None:
                z = args[0].unflatten(-1, (H, lm.cfg.d_head))
                W_O = a.W_O(layer).to(z.dtype)
                ho = torch.einsum("bphe,hem->hbpm", z, W_O)
                for h in range(H):
                    self.actual[first_head + h] = ho[h]

            def pre_mlp(
                mod: nn.Module,
                args: tuple,
                kwargs: dict,
                mlp_idx: int = mlp_idx,
                mlp_col: slice = mlp_col,
            ) -> Any:
                x = args[0] if args else kwargs["hidden_states"]
                d = self._delta(mlp_idx, mlp_col, x)[0]
                new = x + d
                return (
                    ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
                )

            def post_mlp(mod: nn.Module, args: tuple, out: Any, mlp_idx: int = mlp_idx) -> None:
                self.actual[mlp_idx] = out[0] if isinstance(out, tuple) else out

            self.handles.append(
                _attn_in_norm(lm, layer).register_forward_pre_hook(pre_attn, with_kwargs=True)
            )
            for mod, key, idx, w, b in _proj_weights(lm, layer):

                def hook(
                    m: nn.Module,
                    args: tuple,
                    out: Tensor,
                    layer: int = layer,
                    spec: Any = (key, idx, w, b),
                ) -> Tensor:
                    return qkv_out(m, args, out, layer, spec)

                self.handles.append(mod.register_forward_hook(hook))
            self.handles.append(a.o_proj(layer).register_forward_pre_hook(pre_oproj))
            self.handles.append(
                a.mlp_in_norm(layer).register_forward_pre_hook(pre_mlp, with_kwargs=True)
            )
            self.handles.append(a.mlp(layer).register_forward_hook(post_mlp))
        n_up = len(g.upstream)
        logit_col = slice(g.n_layers * per, g.n_layers * per + 1)

        def pre_final(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            new = x + self._delta(n_up, logit_col, x)[0]
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        self.handles.append(a.final_norm().register_forward_pre_hook(pre_final, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.actual.clear()
        self.normed.clear()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
