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

Bound to a question (:meth:`Edges.bind`), the kind gives :class:`EdgesBound`:

* ``f(keep [m, n_edges])``: every downstream node's input is the sum over its
  upstream nodes of the kept edges' *actual* outputs (this very run's) and
  the ablated edges' *ablated* outputs (the counterfactual run's, zero, the
  mean over reference prompts, a resampled prompt's, or the noised run's),
  exactly; many masks go through one forward (one batch row per mask);
* ``f_gated(g)``: the same with ``g * actual + (1 - g) * ablated`` per edge,
  differentiable in ``g``;
* ``gate_grad(g)``: for gates equal on every edge (what gradient estimators
  use: EAP at ``g = 1``, EAP-IG along ``g = alpha``) one forward and one
  backward give every edge's derivative in closed form,
  ``d f / d g_uv = (a_u - ablated_u) . d f / d x_v`` with ``x_v`` the input of
  ``v`` (the gradient flowing through ``v`` only); other gates use autograd.

Each downstream node gets its own input through the wrapper's per-head input
sites (``blocks.{l}.attn.q_in|k_in|v_in``, ``blocks.{l}.mlp.in``,
``final_norm.input``): see :class:`EdgePatcher`. Supported: models without
post-block norms (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2, Gemma, Phi-3, with or
without grouped-query attention). Edges are summed over positions unless
``per_position=True``.

Example:
    >>> import attrlab as al, torch
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> g = al.units.Edges().graph(lm)
    >>> g.upstream[:2], g.downstream[-1], g.n_edges
    (['embed', 'a0.h0'], 'logits', 110)
    >>> b = al.units.Edges().bind(lm, "a b c", al.targets.resolve(" a", lm),
    ...                           al.ablations.Counterfactual("a c c"))
    >>> tuple(b.f(torch.rand(5, b.n) < 0.5).shape)
    (5, 1)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..ablations import Ablation, Counterfactual, Mean, Noise, Resample, Zero
from ..errors import CounterfactualWarning, InputError
from ..model.budget import memory_budget, row_bytes
from ..model.interventions import Intervention
from ..model.lock import holds_model_lock
from .base import Bound, Units, register_units

__all__ = ["EdgeGraph", "EdgePatcher", "Edges", "EdgesBound", "edge_activations", "input_gradients"]


@dataclass
class EdgeGraph:
    """Nodes and edges of a model's residual graph (see the module docs).

    Attributes:
        upstream: upstream node names ``[U]`` (``embed``, ``a{l}.h{h}``, ``m{l}``).
        n_kv_heads: key/value heads per layer (0: one per query head).
        downstream: downstream node names ``[V]``.
        adjacency: bool ``[U, V]``: ``u -> v`` is an edge.
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

    def to_meta(self) -> dict[str, Any]:
        """JSON-able shape facts that rebuild this graph (:meth:`from_meta`)."""
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "qkv": self.qkv,
            "parallel": self.parallel,
            "n_pos": self.n_pos,
        }

    @classmethod
    def from_meta(cls, m: dict[str, Any]) -> EdgeGraph:
        """Inverse of :meth:`to_meta`.

        Example:
            >>> g = EdgeGraph.build(2, 4, n_kv_heads=2)
            >>> EdgeGraph.from_meta(g.to_meta()).downstream == g.downstream
            True
        """
        return cls.build(
            int(m["n_layers"]),
            int(m["n_heads"]),
            bool(m.get("qkv", True)),
            bool(m.get("parallel", False)),
            int(m.get("n_pos", 0) or 0),
            int(m.get("n_kv_heads", 0) or 0),
        )

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
        """Label columns ``upstream``, ``downstream`` (and ``position``), one entry per edge."""
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
        """Edge values ``[..., n_edges]`` -> ``[..., U, V]`` (or ``[..., U, V, n_pos]``
        per position; 0 off the graph), in the dtype and on the device of ``scores``."""
        idx = self.edge_index().to(scores.device)
        U, V = len(self.upstream), len(self.downstream)
        lead = scores.shape[:-1]
        if self.n_pos:
            out = scores.new_zeros(*lead, U, V, self.n_pos)
            out[..., idx[:, 0], idx[:, 1], :] = scores.reshape(*lead, len(idx), self.n_pos)
            return out
        out = scores.new_zeros(*lead, U, V)
        out[..., idx[:, 0], idx[:, 1]] = scores
        return out

    def from_matrix(self, m: Tensor) -> Tensor:
        """``[..., U, V]`` (or ``[..., U, V, n_pos]``) -> ``[..., n_edges]``."""
        idx = self.edge_index().to(m.device)
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

    def up_groups(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of the upstream nodes written together (``embed``,
        each layer's heads, each MLP), in the order a forward writes them."""
        out = [(0, 1)]
        for layer in range(self.n_layers):
            first, mlp = self.up_index(layer)
            out += [(first, mlp), (mlp, mlp + 1)]
        return out

    def readers(self) -> list[tuple[str, int, slice, int]]:
        """Where downstream nodes read, in forward order: ``(site, layer, columns
        of downstream nodes, number of upstream nodes before it)``. Sites:
        ``attn.q_in`` / ``attn.k_in`` / ``attn.v_in`` (``attn.in``: all three with
        ``qkv=False``), ``mlp.in``, ``final_norm.input`` (layer -1)."""
        per = self.down_slices()["per_layer"]
        nq, nk, nv = self.head_inputs
        out = []
        for layer in range(self.n_layers):
            first, mlp = self.up_index(layer)
            c0 = layer * per
            if self.qkv:
                out.append(("attn.q_in", layer, slice(c0, c0 + nq), first))
                out.append(("attn.k_in", layer, slice(c0 + nq, c0 + nq + nk), first))
                out.append(("attn.v_in", layer, slice(c0 + nq + nk, c0 + per - 1), first))
            else:
                out.append(("attn.in", layer, slice(c0, c0 + nq), first))
            out.append(
                ("mlp.in", layer, slice(c0 + per - 1, c0 + per), first if self.parallel else mlp)
            )
        out.append(
            (
                "final_norm.input",
                -1,
                slice(self.n_layers * per, self.n_layers * per + 1),
                len(self.upstream),
            )
        )
        return out

    @staticmethod
    def node_of(down: str) -> str:
        """The node a downstream input belongs to (``a1.h2.q`` -> ``a1.h2``; a shared
        key/value input ``a1.kv0.k`` -> ``a1.kv0``).

        Example:
            >>> EdgeGraph.node_of("a1.h2.q"), EdgeGraph.node_of("m0")
            ('a1.h2', 'm0')
        """
        if down.endswith((".q", ".k", ".v")):
            return down[:-2]
        return down

    def readers_of(self, down: str) -> list[str]:
        """The upstream nodes whose output depends on downstream input ``down``: its
        head (or MLP), every query head sharing a key/value input, or ``logits``.

        Example:
            >>> EdgeGraph.build(1, 4, n_kv_heads=2).readers_of("a0.kv1.k")
            ['a0.h2', 'a0.h3']
        """
        node = self.node_of(down)
        parts = node.split(".")
        if len(parts) == 2 and parts[1].startswith("kv"):
            r = self.n_heads // self.n_kv_heads
            g = int(parts[1][2:])
            return [f"{parts[0]}.h{h}" for h in range(g * r, (g + 1) * r)]
        return [node]


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

    Ablations: a counterfactual prompt (``counterfactual=``; there is no default,
    give one or another ablation), ``"zero"``, ``"mean"`` and ``"resample"``
    (``reference=`` prompts), ``"noise"`` (the run with noised embeddings).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> al.units.Edges(qkv=False).graph(lm).n_edges
        54
    """

    provides = frozenset({"f", "gates"})
    ablations = (Counterfactual, Zero, Mean, Resample, Noise)

    def __init__(self, qkv: bool = True, per_position: bool = False):
        self.qkv = qkv
        self.per_position = per_position

    def default_ablation(self) -> Ablation | None:
        """Edges have no default: a counterfactual prompt is the usual choice.

        Raises:
            InputError: always, saying what to pass.
        """
        raise InputError(
            "edge units need an ablation: pass counterfactual=<a prompt of the same token "
            "length> (the usual choice), or ablation='zero', 'mean' / 'resample' with "
            "reference=<prompts>, or 'noise'"
        )

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

    def bind(  # type: ignore[override]
        self,
        lm: Any,
        inputs: Any,
        target: Any,
        ablation: Ablation | None = None,
        batch_size: int | None = None,
        memory_budget: int | str | None = None,
        progress: bool = False,
    ) -> EdgesBound:
        """Bind to a question: ``f`` / ``f_gated`` / ``gate_grad`` over these edges.

        Args:
            batch_size: batch rows per forward (each mask takes one row per
                prompt); None: as many as fit the memory budget.
            memory_budget: see :mod:`attrlab.model.budget`.
            progress: a progress bar over forwards.

        Example:
            >>> import attrlab as al, torch
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> b = al.units.Edges().bind(lm, "a b c", al.targets.resolve(" a", lm), al.ablations.Zero())
            >>> bool(b.f(torch.ones(1, b.n, dtype=torch.bool))[0, 0] == b.clean()[0])
            True
        """
        return EdgesBound(
            self, lm, inputs, target, self.check_ablation(ablation), batch_size, memory_budget,
            progress,
        )  # fmt: skip


def check_supported(lm: Any) -> None:
    """Raise :class:`InputError` for architectures edges do not support yet."""
    c = lm.cfg
    if c.post_block_norms:
        raise InputError(
            f"edge units need each component's output to add linearly to the residual; "
            f"{c.family} normalizes attention/MLP outputs before adding them (not supported)"
        )


# ------------------------------------------------------------------ runs
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
    interventions: Sequence[Intervention] = (),
) -> Any:
    """Upstream node outputs ``[U, batch, pos, d_model]`` of a run (with
    ``interventions``, e.g. noised embeddings); with ``return_logits``,
    ``(outputs, logits)``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> edge_activations(lm, lm.tokenize("a b"), g).shape
        torch.Size([11, 1, 2, 32])
    """
    L = graph.n_layers
    with torch.set_grad_enabled(grad):
        logits, cache = lm.run(
            batch,
            cache=_upstream_sites(L),
            grad=grad,
            last_only=last_only,
            interventions=list(interventions),
        )
    act = _stack_upstream(cache, L)
    return (act, logits) if return_logits else act


def _reader_sites(graph: EdgeGraph) -> list[str]:
    """Site names of every reader, ``attn.in`` expanded to its three sites."""
    out = []
    for site, layer, _, _ in graph.readers():
        if site == "attn.in":
            out += [f"blocks.{layer}.attn.{c}_in" for c in "qkv"]
        elif layer >= 0:
            out.append(f"blocks.{layer}.{site}")
        else:
            out.append(site)
    return out


def _reader_grads(graph: EdgeGraph, cache: Any, grads: dict[str, Tensor]) -> Tensor:
    """Gradients at every downstream node's own input ``[V, b, p, d]`` (contiguous)
    from the gradients at the reader sites (a head's q/k/v inputs summed with
    ``qkv=False``)."""
    out = []
    for site, layer, _, _ in graph.readers():
        if site == "attn.in":
            parts = [grads[f"blocks.{layer}.attn.{c}_in"] for c in "qkv"]
            out.append((parts[0] + parts[1] + parts[2]).permute(2, 0, 1, 3))
        elif site.startswith("attn."):
            out.append(grads[f"blocks.{layer}.{site}"].permute(2, 0, 1, 3))  # [heads, b, p, d]
        else:
            name = f"blocks.{layer}.{site}" if layer >= 0 else site
            out.append(grads[name][None])
    return torch.cat(out, 0)


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
    """Gradient of the metric with respect to each downstream node's own input
    (through that node only) ``[V, batch, pos, d_model]``, from one forward and
    one backward: the gradients at the reader sites ``blocks.{l}.attn.q_in|k_in|v_in``
    (each head's own copy of its input), ``blocks.{l}.mlp.in`` and
    ``final_norm.input``.

    ``metric_fn(logits, batch) -> [batch]`` (summed for the backward). Returns
    ``(grads, metric values [batch])``, and the run's upstream outputs
    ``[U, batch, pos, d_model]`` as a third item with ``with_activations``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> t = al.targets.resolve(" a", lm)
        >>> grads, m = input_gradients(lm, lm.tokenize("a b"), g, t)
        >>> grads.shape
        torch.Size([27, 1, 2, 32])
    """
    sites = _reader_sites(graph)
    ups = _upstream_sites(graph.n_layers) if with_activations else []
    with torch.enable_grad():
        logits, cache = lm.run(
            batch, cache=sites + ups, interventions=list(interventions), grad=True,
            last_only=last_only,
        )  # fmt: skip
        m = metric_fn(logits, cache.batch)
        gs = torch.autograd.grad(m.sum(), [cache[s] for s in sites], allow_unused=True)
    grads = {s: torch.zeros_like(cache[s]) if g is None else g for s, g in zip(sites, gs)}
    out = _reader_grads(graph, cache, grads).detach()
    if with_activations:
        act = _stack_upstream({s: cache[s].detach() for s in ups}, graph.n_layers)
        return out, m.detach(), act
    return out, m.detach()


# ------------------------------------------------------------- edge patcher
class EdgePatcher:
    """Runs where every downstream node reads its own input: the edges where
    ``mask`` is 0 carry the ``reference`` (ablated) upstream outputs, the others
    this run's actual outputs,

        x_v = x_v(actual) + sum_u (1 - mask[u, v]) * (reference_u - a_u(actual)).

    Built on the wrapper's interventions: callables on the upstream sites
    (``blocks.0.resid_pre``, ``blocks.{l}.attn.head_out``, ``blocks.{l}.mlp.out``)
    record this run's outputs, callables on the reader sites
    (``blocks.{l}.attn.q_in|k_in|v_in``, ``blocks.{l}.mlp.in``,
    ``final_norm.input``) add the patch. Use :meth:`run`, or the patcher as a
    context manager around ``lm.run`` (it holds the model's lock for the block).

    Args:
        lm: the wrapped model.
        graph: its :class:`EdgeGraph`.
        reference: ablated upstream outputs ``[U, ref_rows, pos, d_model]``
            (None: zero); ``ref_rows`` divides the run's batch (row ``r`` uses
            reference row ``r // (batch / ref_rows)``: prompt-major repeats).
        mask: ``[R, U, V]`` (or ``[R, U, V, pos]`` per position) float, 1 = keep
            the actual value, 0 = patch, in between = a gate; may require grad.
            Row ``r`` of the run uses mask ``r % R`` (``R`` divides the batch).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> g = al.units.Edges().graph(lm)
        >>> ref = edge_activations(lm, lm.tokenize("a c"), g)
        >>> keep = torch.ones(1, len(g.upstream), len(g.downstream))
        >>> same, _ = EdgePatcher(lm, g, ref, keep).run("a b")
        >>> bool(torch.allclose(same, lm.run("a b")[0], atol=1e-5))
        True
    """

    def __init__(self, lm: Any, graph: EdgeGraph, reference: Tensor | None, mask: Tensor):
        check_supported(lm)
        self.lm, self.g = lm, graph
        adj = graph.adjacency.to(device=mask.device, dtype=mask.dtype)
        if mask.dim() == 4:  # per position [R, U, V, P]
            adj = adj[..., None]
        self.w = (1.0 - mask) * adj  # [R, U, V(, P)] weight of the patch
        self.groups = graph.up_groups()
        # reference per group, [ref_rows, u, p, d] (None: zero)
        self.ref = (
            None if reference is None else [reference[a:b].transpose(0, 1) for a, b in self.groups]
        )
        # this run's patches ref - actual of the upstream nodes recorded so far:
        # without gradients one buffer [n, U, p, d] written in place; with
        # gradients one tensor per group (joined per reader)
        self.buf: Tensor | None = None
        self.diff: list[Tensor | None] = [None] * len(self.groups)
        self.n_recorded = 0  # upstream nodes recorded in this run
        self._memo: dict[tuple[int, int, int], Tensor] = {}  # reader deltas of this run
        self._ctx: Any = None

    # -------------------------------------------------------------- recording
    def _record(self, i: int, actual: Tensor) -> None:
        """Group ``i``'s outputs of this run ``[n, u, p, d]`` -> its patch ``ref - actual``."""
        if i == 0:  # a new run
            self._reset()
        n = actual.shape[0]
        a, b = self.groups[i]
        ref = None if self.ref is None else self.ref[i]
        grad = torch.is_grad_enabled()
        if not grad and self.buf is None:
            self.buf = actual.new_empty(n, len(self.g.upstream), *actual.shape[2:])
        if ref is None:
            if grad:
                self.diff[i] = -actual
            else:
                assert self.buf is not None
                torch.neg(actual, out=self.buf[:, a:b])
        else:
            r = ref.shape[0]
            if n % r:
                raise InputError(f"reference has {r} rows; the run has {n}")
            ref = ref.to(device=actual.device, dtype=actual.dtype)[:, None]  # [r, 1, u, p, d]
            act = actual.reshape(r, n // r, *actual.shape[1:])
            if grad:
                self.diff[i] = (ref - act).reshape(actual.shape)
            else:
                assert self.buf is not None
                torch.sub(ref, act, out=self.buf[:, a:b].unflatten(0, (r, n // r)))
        self.n_recorded = b

    def _reset(self) -> None:
        self.buf = None
        self.diff = [None] * len(self.groups)
        self.n_recorded = 0
        self._memo = {}

    def _patches(self, n_up: int) -> Tensor:
        """The patches of the first ``n_up`` upstream nodes ``[n, n_up, p, d]``."""
        if n_up > self.n_recorded:
            raise RuntimeError(f"upstream nodes up to {n_up} were not recorded before a reader")
        if self.buf is not None:
            return self.buf[:, :n_up]
        parts = [d for (a, _), d in zip(self.groups, self.diff) if a < n_up]
        return torch.cat(parts, 1)  # type: ignore[arg-type]

    def _delta(self, cols: slice, n_up: int, like: Tensor) -> Tensor:
        """``[n, V_cols, p, d]``: sum over upstream ``u < n_up`` of ``w[u, v] * patch_u``."""
        key = (cols.start, cols.stop, n_up)
        if key in self._memo:  # the three inputs of a head with qkv=False
            return self._memo[key]
        n = like.shape[0]
        R = self.w.shape[0]
        if n % R:
            raise InputError(f"mask has {R} rows; the run has {n}")
        diff = self._patches(n_up)  # [n, u, p, d]
        w = self.w[:, :n_up, cols].to(like.dtype)  # [R, u, v(, P)]
        q, p, d = n // R, diff.shape[2], diff.shape[3]
        if w.dim() == 4:  # per position
            out = torch.einsum("ruvp,qrupd->qrvpd", w, diff.reshape(q, R, n_up, p, d))
        else:  # one batched matrix product over rows
            out = torch.matmul(w.transpose(1, 2), diff.reshape(q, R, n_up, p * d))
        self._memo[key] = out = out.reshape(n, -1, p, d)
        return out

    def interventions(self) -> list[Intervention]:
        """The interventions of one patched run (they record upstream outputs and
        patch every reader)."""
        g = self.g
        ivs: list[Intervention] = []

        def recorder(i: int, heads: bool) -> Callable[[Tensor], Tensor]:
            def fn(x: Tensor) -> Tensor:
                self._record(i, x.permute(0, 2, 1, 3) if heads else x[:, None])
                return x

            return fn

        ivs.append(Intervention("blocks.0.resid_pre", recorder(0, False)))
        for layer in range(g.n_layers):
            ivs.append(Intervention(f"blocks.{layer}.attn.head_out", recorder(1 + 2 * layer, True)))
            ivs.append(Intervention(f"blocks.{layer}.mlp.out", recorder(2 + 2 * layer, False)))

        def reader(cols: slice, n_up: int, heads: bool) -> Callable[[Tensor], Tensor]:
            def fn(x: Tensor) -> Tensor:
                d = self._delta(cols, n_up, x)  # [n, v, p, d]
                return x + (d.permute(0, 2, 1, 3) if heads else d[:, 0])

            return fn

        def reader_of_all(cols: slice, sub: slice, n_up: int) -> Callable[[Tensor], Tensor]:
            def fn(x: Tensor) -> Tensor:
                d = self._delta(cols, n_up, x)[:, sub]  # [n, heads, p, d]
                return x + d.permute(0, 2, 1, 3)

            return fn

        per = g.down_slices()["per_layer"]
        for site, layer, cols, n_up in g.readers():
            if site == "attn.in":
                for c in "qkv":
                    ivs.append(
                        Intervention(f"blocks.{layer}.attn.{c}_in", reader(cols, n_up, True))
                    )
            elif site.startswith("attn."):
                # the layer's q, k and v inputs from one product (the patches are read once)
                c0 = layer * per
                sub = slice(cols.start - c0, cols.stop - c0)
                fn = reader_of_all(slice(c0, c0 + per - 1), sub, n_up)
                ivs.append(Intervention(f"blocks.{layer}.{site}", fn))
            elif layer >= 0:
                ivs.append(Intervention(f"blocks.{layer}.{site}", reader(cols, n_up, False)))
            else:
                ivs.append(Intervention(site, reader(cols, n_up, False)))
        return ivs

    def run(self, inputs: Any, **kw: Any) -> Any:
        """``lm.run(inputs, **kw)`` with the edges patched: ``(logits, cache)``."""
        ivs = [*self.interventions(), *kw.pop("interventions", [])]
        try:
            return self.lm.run(inputs, interventions=ivs, **kw)
        finally:
            self._reset()

    def __enter__(self) -> EdgePatcher:
        self._ctx = self.lm.intervening(self.interventions())
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        ctx, self._ctx = self._ctx, None
        self._reset()
        if ctx is not None:
            ctx.__exit__(*exc)


# ----------------------------------------------------------------- binding
def _next_token_only(target: Any) -> bool:
    """Whether ``target`` reads the last position only (logits can be cut)."""
    from ..targets import KL, Logit, LogitDiff, LogProb, Prob

    return isinstance(target, (Logit, LogProb, Prob, LogitDiff, KL)) and bool(target.next_token)


def _same_tokens(a: Any, b: Any) -> bool:
    return (
        a.input_ids.shape == b.input_ids.shape
        and torch.equal(a.input_ids.cpu(), b.input_ids.cpu())
        and torch.equal(a.attention_mask.cpu(), b.attention_mask.cpu())
    )


class EdgesBound(Bound):
    """Edges bound to a question (see :meth:`Edges.bind` and the module docs).

    Attributes:
        graph: the :class:`EdgeGraph`.
        batch: the prompts ``[n_prompts, pos]`` (prepared by the target).
        actual: the clean run's upstream outputs ``[U, n_prompts, pos, d_model]``.
        reference: the ablated upstream outputs ``[U, ref_rows, pos, d_model]``
            (None for zero).
        ablated_value: the target of the ablated run (counterfactual,
            resampled or noised prompts), or None.
    """

    def __init__(
        self,
        units: Edges,
        lm: Any,
        inputs: Any,
        target: Any,
        ablation: Ablation | None,
        batch_size: int | None = None,
        memory_budget: int | str | None = None,
        progress: bool = False,
    ):
        from ..targets import Target
        from ..targets import resolve as resolve_target

        if ablation is None:
            ablation = units.default_ablation()  # raises: edges need one
        assert ablation is not None
        self.units, self.lm, self.ablation = units, lm, ablation
        check_supported(lm)
        t = target if isinstance(target, Target) else resolve_target(target, lm)
        t.bind(lm)
        if getattr(t, "reduce", None) == "none":
            raise InputError(
                "edge units score one target value per prompt; use a continuation target "
                "with reduce='sum' or 'mean' (one row per continuation token is not supported)"
            )
        self.target = t
        self.batch = t.prepare(lm, lm.tokenize(inputs))
        self.graph = units.graph(lm, n_pos=self.batch.shape[1])
        self.n = self.graph.n_edges
        self.n_rows = 1
        self.target_name = t.describe()
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.progress = progress
        self.last_only = _next_token_only(t)
        self.n_forwards = 0
        self._clean_state: tuple[Tensor, dict[str, Tensor], Tensor] | None = None
        self.ablated_value: float | None = None
        self.identical = False  # the ablation is the clean run itself
        self.reference = self._reference(ablation)
        self._reader_refs: list[Tensor] | None = None

    # ------------------------------------------------------------ clean run
    def _clean_run(self) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """The clean run (once, when first needed; EAP does not need it):
        upstream outputs ``[U, b, p, d]``, every reader's input, the target ``[1]``."""
        if self._clean_state is None:
            L = self.graph.n_layers
            sites = self._reader_input_sites()
            with torch.no_grad():
                logits, cache = self.lm.run(
                    self.batch, cache=_upstream_sites(L) + sites, last_only=self.last_only
                )
            self._clean_state = (
                _stack_upstream(cache, L),
                {s: cache[s] for s in sites},
                self._value(logits, self.batch).reshape(1),
            )
        return self._clean_state

    @property
    def actual(self) -> Tensor:
        """The clean run's upstream outputs ``[U, n_prompts, pos, d_model]``."""
        return self._clean_run()[0]

    # ------------------------------------------------------------ ablation
    def _prepare(self, inputs: Any) -> Any:
        return self.target.prepare(self.lm, self.lm.tokenize(inputs))

    def _reference(self, ablation: Ablation) -> Tensor | None:
        """Ablated upstream outputs ``[U, ref_rows, pos, d]`` (None for zero)."""
        lm, batch, g = self.lm, self.batch, self.graph
        if isinstance(ablation, Zero):
            return None
        if isinstance(ablation, Mean):
            ref = self._prepare(ablation.reference)
            with torch.no_grad():
                act = edge_activations(lm, ref, g, last_only=True)  # [U, r, p', d]
            if ref.shape[1] == batch.shape[1] and bool(ref.attention_mask.all()):
                return act.mean(1, keepdim=True)
            m = ref.attention_mask.to(act.dtype)[None, :, :, None]  # [1, r, p', 1]
            mean = (act * m).sum((1, 2)) / m.sum()  # [U, d]
            return mean[:, None, None].expand(-1, 1, batch.shape[1], -1)
        ivs: list[Intervention] = []
        if isinstance(ablation, Counterfactual):
            if ablation.inputs is None:
                raise InputError("Counterfactual() needs the counterfactual prompt(s)")
            cb = lm.tokenize(ablation.inputs)
            if cb.shape[0] == 1 and batch.shape[0] > 1:
                cb = cb.repeat(batch.shape[0])
            cb = self.target.prepare(lm, cb)
            lm.check_counterfactual(batch, cb)
        elif isinstance(ablation, Resample):
            refs = self._prepare(ablation.reference)
            gen = torch.Generator().manual_seed(int(ablation.seed))
            pick = torch.randint(0, refs.shape[0], (batch.shape[0],), generator=gen)
            cb = refs[pick.to(refs.input_ids.device)]
            lm.check_counterfactual(batch, cb)
        elif isinstance(ablation, Noise):
            from .components import noise_interventions

            cb = batch
            ivs = noise_interventions(lm, batch, ablation)
        else:
            raise InputError(f"edges cannot use ablation {ablation.name!r}")
        with torch.no_grad():
            ref, logits = edge_activations(
                lm, cb, g, return_logits=True, last_only=self.last_only, interventions=ivs
            )
        self.ablated_value = float(self._value(logits, cb)[0])
        if not ivs and _same_tokens(batch, cb):
            self.identical = True
            warnings.warn(
                "the counterfactual is the prompt itself: nothing is ablated, f is the "
                "clean value for every mask and every gate gradient is zero. Use a "
                "counterfactual that changes the answer.",
                CounterfactualWarning,
                stacklevel=4,
            )
            return self.actual
        return ref

    # ------------------------------------------------------------ contract
    def labels(self) -> dict[str, list[Any]]:
        return self.graph.labels()

    def meta(self) -> dict[str, Any]:
        g = self.graph
        ids = self.batch.input_ids[0]
        toks = (
            self.lm.to_str_tokens(ids)
            if self.lm.tokenizer is not None
            else [str(int(t)) for t in ids]
        )
        return {
            "tokens": toks,
            "upstream": g.upstream,
            "downstream": g.downstream,
            "graph": g.to_meta(),
            **g.to_meta(),
            "n_forwards": self.n_forwards,
        }

    def clean(self) -> Tensor:
        return self._clean_run()[2]

    def _value(self, logits: Tensor, batch: Any) -> Tensor:
        """Mean target over prompts ``[1]`` (float64)."""
        return self.target(logits, batch).double().mean().reshape(1).cpu()

    def _masks_per_forward(self, grad: bool = False) -> int:
        """Masks per forward (each takes one batch row per prompt)."""
        n_b, p = self.batch.shape
        if self.batch_size is not None:
            from ..model.budget import batch_size_for

            rows = batch_size_for(self.lm, p, cap=1, batch_size=self.batch_size)
            return max(1, rows // n_b)
        c, g = self.lm.cfg, self.graph
        size = torch.finfo(self.lm.dtype).bits // 8
        # upstream outputs and their patches, per-head reader inputs, the mask
        extra = size * p * c.d_model * (2 * len(g.upstream) + 2 * g.n_layers * sum(g.head_inputs))
        extra += 4 * len(g.upstream) * len(g.downstream) * max(1, g.n_pos)
        per_row = row_bytes(self.lm, p, grad, 1 if self.last_only else None) + extra * (
            3 if grad else 1
        )
        budget = memory_budget(self.memory_budget, getattr(self.lm, "device", None))
        return max(1, min(64, budget // (per_row * n_b)))

    def _chunks(self, m: int, grad: bool = False) -> list[slice]:
        k = self._masks_per_forward(grad)
        return [slice(s, min(m, s + k)) for s in range(0, m, k)]

    def _bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, disable=not self.progress, desc=desc)

    def _patched(self, gates: Tensor, grad: bool) -> Tensor:
        """Mean target ``[k]`` for each of ``k`` gate vectors ``[k, n]`` (one batch
        row per gate vector and prompt, prompt-major)."""
        n_b = self.batch.shape[0]
        k = gates.shape[0]
        rows = self.batch.repeat(k)  # row b * k + j: prompt b, gates j
        mask = self.graph.to_matrix(gates.to(self.lm.device))
        patcher = EdgePatcher(self.lm, self.graph, self.reference, mask)
        with torch.set_grad_enabled(grad):
            logits, _ = patcher.run(rows, grad=grad, last_only=self.last_only)
            vals = self.target(logits, rows).double().reshape(n_b, k).mean(0)
        self.n_forwards += 1
        return vals.cpu()

    def f(self, keep: Tensor) -> Tensor:
        keep = self.check_keep(keep)
        out = torch.empty(keep.shape[0], dtype=torch.float64)
        full = keep.all(1)
        out[full] = float(self.clean()[0])
        if self.identical:
            out[:] = float(self.clean()[0])
            return out[:, None]
        todo = (~full).nonzero()[:, 0]
        if len(todo):
            bar = self._bar(len(todo), "edges f")
            dtype = self.lm.dtype
            with torch.no_grad():
                for sl in self._chunks(len(todo)):
                    idx = todo[sl]
                    out[idx] = self._patched(keep[idx].to(dtype), grad=False)
                    bar.update(len(idx))
            bar.close()
        return out[:, None]

    def f_gated(self, g: Tensor) -> Tensor:
        g = self.check_gates(g)
        parts = []
        for sl in self._chunks(g.shape[0], grad=g.requires_grad):
            gg = g[sl]
            if gg.dtype != self.lm.dtype:
                gg = gg.to(self.lm.dtype)
            parts.append(self._patched(gg, grad=torch.is_grad_enabled() and g.requires_grad))
        return torch.cat(parts)[:, None]

    # ------------------------------------------------- closed-form gradients
    def gate_grad(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(f_gated(g) [m, 1], d f_gated / d g [m, 1, n])``. Rows whose gates are
        equal on every edge use the closed form (:meth:`uniform_gate_grad`);
        other rows autograd through :meth:`f_gated`."""
        g = self.check_gates(g).detach()
        uniform = (g == g[:, :1]).all(1)
        if not bool(uniform.all()):
            return super().gate_grad(g)
        vals, grads = self.uniform_gate_grad(g[:, 0])
        return vals[:, None], grads[:, None]

    def gate_grad_sum(self, g: Tensor, weights: Tensor, chunk: int = 32) -> tuple[Tensor, Tensor]:
        """``sum_k weights_k * d f_gated / d g`` at gates ``g [k, n]``: ``([1, n],
        values [k, 1])``, by the closed form when every row's gates are equal."""
        g = self.check_gates(g).detach()
        if not bool((g == g[:, :1]).all()):
            return super().gate_grad_sum(g, weights, chunk)
        vals, acc = self.uniform_gate_grad(g[:, 0], weights)
        return acc[None], vals[:, None]

    def _reader_input_sites(self) -> list[str]:
        """Per reader of :meth:`EdgeGraph.readers`, the site holding its clean input."""
        out = []
        for site, layer, _, _ in self.graph.readers():
            if site.startswith("attn."):
                out.append(f"blocks.{layer}.resid_pre")
            else:
                out.append(f"blocks.{layer}.mlp.in" if layer >= 0 else site)
        return out

    def _reader_references(self) -> list[Tensor]:
        """Every reader's input with all its edges ablated, ``[b, p, d]`` per reader
        of :meth:`EdgeGraph.readers` (``attn.in``: one for its three sites): the
        clean input plus the sum of ``reference_u - actual_u`` over its upstream."""
        if self._reader_refs is not None:
            return self._reader_refs
        act = self.actual  # [U, b, p, d]
        ref = torch.zeros_like(act[:, :1]) if self.reference is None else self.reference
        csum = (ref.to(act.dtype) - act).cumsum(0)  # [U, b, p, d]
        readers = zip(self.graph.readers(), self._reader_input_sites())
        self._reader_refs = [self._clean_run()[1][s] + csum[n_up - 1] for (*_, n_up), s in readers]
        return self._reader_refs

    def empty(self) -> Tensor:
        """``f(no edge)``: with a counterfactual, resampled or noised run, that
        run's target (every reader then reads exactly that run's inputs)."""
        if self.ablated_value is not None:
            return torch.tensor([self.ablated_value], dtype=torch.float64)
        return super().empty()

    def uniform_gate_grad(
        self, alphas: Tensor, weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The closed-form gate gradient where every edge has the gate ``alpha``:
        one forward and one backward per chunk of alphas, every reader's input
        set to ``alpha * x + (1 - alpha) * x_ablated`` (exactly ``f_gated`` at
        those gates), then ``d f / d g_uv = (a_u - ablated_u) . d f / d x_v``.

        Returns ``(values [k] float64, gradients [k, n] float64)``, or with
        ``weights [k]`` ``(values [k], sum_k weights_k * gradients_k [n])``.
        """
        alphas = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
        k = len(alphas)
        vals = torch.empty(k, dtype=torch.float64)
        grads = (
            torch.zeros(self.n, dtype=torch.float64)
            if weights is not None
            else torch.zeros(k, self.n, dtype=torch.float64)
        )
        if self.identical:
            vals[:] = float(self.clean()[0])
            return vals, grads
        bar = self._bar(k, "edges gate gradients")
        for sl in self._chunks(k, grad=True):
            w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)[sl]
            v, gr = self._uniform_chunk(alphas[sl], w)
            vals[sl] = v
            if weights is None:
                grads[sl] = gr
            else:
                grads += gr
            bar.update(len(alphas[sl]))
        bar.close()
        return vals, grads

    def _uniform_chunk(
        self, alphas: Tensor, weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Values ``[k]`` and gate gradients ``[k, n]`` at ``k`` uniform gates, or
        with ``weights [k]`` their weighted sum ``[n]`` (one matrix product)."""
        lm, g = self.lm, self.graph
        n_b = self.batch.shape[0]
        k = len(alphas)
        rows = self.batch.repeat(k)  # row b * k + j: prompt b, alpha j
        a_rows = alphas.to(lm.device, lm.dtype).repeat(n_b)  # [n]
        ivs: list[Intervention] = []
        if bool((alphas != 1).any()):
            refs = self._reader_references()

            def mix(ref: Tensor, heads: bool) -> Callable[[Tensor], Tensor]:
                r = ref.to(lm.dtype).repeat_interleave(k, 0)  # [n, p, d]: one per prompt
                if heads:
                    r = r[:, :, None]
                shape = (-1, 1, 1, 1) if heads else (-1, 1, 1)

                a = a_rows.reshape(shape)

                def fn(x: Tensor) -> Tensor:
                    return torch.lerp(r, x, a)  # a * x + (1 - a) * r

                return fn

            for (site, layer, _, _), ref in zip(g.readers(), refs):
                if site == "attn.in":
                    for c in "qkv":
                        ivs.append(Intervention(f"blocks.{layer}.attn.{c}_in", mix(ref, True)))
                elif layer >= 0:
                    ivs.append(
                        Intervention(f"blocks.{layer}.{site}", mix(ref, site.startswith("attn.")))
                    )
                else:
                    ivs.append(Intervention(site, mix(ref, False)))
        grads, m, act = input_gradients(
            lm, rows, g, self.target, interventions=ivs, last_only=self.last_only,
            with_activations=True,
        )  # fmt: skip
        self.n_forwards += 1
        # grads [V, n, p, d]; act [U, n, p, d]; a_u - ablated_u per row
        if self.reference is None:
            diff = act
        else:
            ref = self.reference.to(act.dtype)  # [U, b | 1, p, d]
            r = ref.repeat_interleave(k, 1) if ref.shape[1] == n_b else ref
            diff = act - r
        gt = grads.to(diff.dtype)
        vals = m.double().reshape(n_b, k).mean(0).cpu()
        U, n = diff.shape[0], diff.shape[1]
        if weights is not None:  # sum_j w_j G_j (and the mean over prompts) in one product
            w_rows = (weights.to(gt.device, gt.dtype) / n_b).repeat(n_b)  # row b * k + j
            gw = gt * w_rows[None, :, None, None]
            if g.n_pos:
                S = torch.einsum("unpd,vnpd->uvp", diff, gw)  # [U, V, P]
            else:
                S = diff.reshape(U, -1) @ gw.reshape(gw.shape[0], -1).T  # [U, V]
            return vals, g.from_matrix(S.double()).cpu()
        if g.n_pos:
            G = torch.einsum("unpd,vnpd->nuvp", diff, gt)  # [n, U, V, P]
        else:
            G = torch.bmm(
                diff.transpose(0, 1).reshape(n, U, -1),
                gt.transpose(0, 1).reshape(n, gt.shape[0], -1).transpose(1, 2),
            )  # [n, U, V]
        G = G.double().reshape(n_b, k, *G.shape[1:]).mean(0)  # mean over prompts
        return vals, g.from_matrix(G).cpu()
