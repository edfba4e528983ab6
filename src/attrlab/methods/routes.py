"""Information-flow routes (Ferrando & Voita, "Information Flow Routes:
Automatically Interpreting Language Models at Scale"; the method behind the
LLM Transparency Tool).

From one forward pass, each residual update is split into additive parts and
each part is scored by how close it is to the updated stream. For a sum
``y = sum_c c``, the proximity of part ``c`` is ``max(0, |y|_1 - |y - c|_1)``
and its importance is its proximity over the sum of all parts' proximities, so
the importances of the parts of one update sum to 1 (or are all 0).

Nodes are token representations: ``x{l}.{p}`` is the residual stream at
position ``p`` entering block ``l`` (``x{L}.{p}``: after the last block), and
``m{l}.{p}`` the stream after block ``l``'s attention (sequential blocks only).
The parts of an update are

- after attention, ``m{l}.{i} = x{l}.{i} + sum_{h, j} a^h_{ij} v^h_j W_O^h + b_O``:
  the residual ``x{l}.{i}`` (edge kind ``residual``) and each source ``x{l}.{j}``
  through each head ``h`` (kind ``attention``; with ``per_head=False`` the heads
  of one source are summed into one part). A post-attention norm (Gemma 2/3)
  is applied to each part with its scale frozen at the clean run's.
- after the MLP, ``x{l+1}.{i} = m{l}.{i} + mlp(m{l}.{i})``: the residual and
  the MLP's output (kind ``mlp``, an edge from ``m{l}.{i}`` to ``x{l+1}.{i}``).
  Parallel blocks (GPT-NeoX) have one update with the residual, the attention
  parts and the MLP.

Biases are part of ``y`` but are not parts (they have no source node). The
graph is built top-down: from the prediction's node ``x{L}.{p}``, keep the
parts with importance above ``tau`` and continue from their source nodes; only
the reached nodes' updates are decomposed (chunked, so memory stays bounded).
Several predictions of one prompt share the forward; each edge lists the
``roots`` whose graph contains it.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> g = al.routes(lm, "When Mary and John went to the store", tau=0.05)
    >>> g.method, g.nodes["id"][-1] == f"x{lm.cfg.n_layers}.{len(g.meta['tokens']) - 1}"
    ('routes', True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..graph import GraphResult
from ..model.lock import holds_model_lock
from ..model.wrapper import LM, Inputs

__all__ = ["routes", "proximity_importance"]


def proximity_importance(y: Tensor, parts: Tensor) -> Tensor:
    """Importances of ``parts [..., k, d]`` of the sums ``y [..., d]``: proximity
    ``max(0, |y|_1 - |y - c|_1)`` normalized over the ``k`` parts.

    Example:
        >>> y = torch.tensor([2.0, 0.0])
        >>> proximity_importance(y, torch.tensor([[2.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])).tolist()
        [1.0, 0.0, 0.0]
    """
    prox = (y.abs().sum(-1)[..., None] - (y[..., None, :] - parts).abs().sum(-1)).clamp_min(0)
    total = prox.sum(-1, keepdim=True)
    return torch.where(total > 0, prox / total.clamp_min(1e-30), torch.zeros_like(prox))


def _prox(y: Tensor, c: Tensor) -> Tensor:
    """Unnormalized proximity of ``c [..., d]`` to ``y`` (broadcast): ``[...]``."""
    return (y.abs().sum(-1) - (y - c).abs().sum(-1)).clamp_min(0)


def _positions(spec: Any, n: int) -> list[int]:
    if spec == "last":
        return [n - 1]
    if spec == "all":
        return list(range(n))
    items = [spec] if isinstance(spec, int) else list(spec)
    out = []
    for p in items:
        if not isinstance(p, int) or not -n <= p < n:
            raise InputError(
                f"positions must be 'last', 'all' or indices in [-{n}, {n}); got {p!r}"
            )
        out.append(p % n)
    return sorted(set(out))


@holds_model_lock
@torch.no_grad()
def routes(
    lm: LM,
    prompt: Inputs,
    positions: Any = "last",
    tau: float = 0.04,
    per_head: bool = True,
    prepend_bos: bool | None = None,
    chunk: int = 8,
) -> GraphResult:
    """The information-flow route graph of the predictions at ``positions``.

    Args:
        lm: the wrapped model.
        prompt: one prompt (text or token ids).
        positions: ``"last"`` (default), ``"all"``, an index or a list of indices:
            the predictions (roots); they share one forward.
        tau: keep parts whose importance is above ``tau`` (in [0, 1)).
        per_head: one attention edge per (head, source) (default) or per source.
        chunk: query positions decomposed at once (bounds memory).

    Returns:
        A :class:`~attrlab.graph.GraphResult`: nodes (``id``, ``kind`` ``x``/``m``,
        ``layer``, ``level``, ``position``, ``token``) and edges (``source``,
        ``target``, ``weight`` = importance, ``kind``, ``layer``, ``head``,
        ``roots``). ``diagnostics["decomposition_error"]``: the largest
        ``|sum of parts + biases - update|`` over the decomposed updates.

    Raises:
        InputError: several prompts, bad positions or tau.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> g = routes(lm, "a b c d", tau=0.0)
        >>> e = g.incoming(f"x{lm.cfg.n_layers}.3")
        >>> abs(sum(e["weight"]) - 1.0) < 1e-6
        True
    """
    if not isinstance(tau, (int, float)) or not 0 <= tau < 1:
        raise InputError(f"tau must be a number in [0, 1), got {tau!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk must be a positive integer, got {chunk!r}")
    batch = lm.tokenize(prompt, prepend_bos)
    if batch.shape[0] != 1:
        raise InputError(f"routes explain one prompt; got {batch.shape[0]}")
    n = batch.shape[1]
    roots = _positions(positions, n)
    c = lm.cfg
    L, H = c.n_layers, c.n_heads
    parallel = bool(c.parallel_residual)
    sites = []
    for layer in range(L):
        p = f"blocks.{layer}."
        sites += [p + s for s in ("resid_pre", "attn.pattern", "attn.v", "attn.out", "mlp.out",
                                  "resid_post")]  # fmt: skip
        if not parallel:
            sites.append(p + "resid_mid")
        if lm.has_norm(p + "attn_out_norm"):
            sites.append(p + "attn.z")
    with torch.no_grad():
        _, cache = lm.run(batch, cache=sites)
    dt = torch.float32 if cache[sites[0]].dtype != torch.float64 else torch.float64

    def get(name: str) -> Tensor:
        return cache[name][0].to(dt)

    edges: dict[str, list[Any]] = {
        k: [] for k in ("source", "target", "weight", "kind", "layer", "head")
    }
    dec_err = 0.0

    def add(src: str, dst: str, w: Any, kind: str, layer: int, head: int = -1) -> None:
        edges["source"].append(src)
        edges["target"].append(dst)
        edges["weight"].append(float(w))
        edges["kind"].append(kind)
        edges["layer"].append(layer)
        edges["head"].append(head)

    def attention_parts(
        layer: int, rows: list[int]
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """What the attention update at ``rows`` is made of: the pattern ``[H, q, n]``,
        each head's value per source through W_O ``u [H, n, d]`` (a part is
        ``pattern * u``, times ``scale [q, 1]`` behind a post-attention norm)
        and the bias term ``[q, d]`` (b_O, or the norm of b_O and its bias)."""
        p = f"blocks.{layer}."
        A = get(p + "attn.pattern")[:, rows]  # [H, q, n]
        v = get(p + "attn.v")  # [n, kv, dh]
        v = v.repeat_interleave(H // v.shape[1], dim=1)  # [n, H, dh]
        W_O = lm.W_O(layer).detach().to(dt)  # [H, dh, d]
        u = torch.einsum("jhe,hed->hjd", v, W_O)  # [H, n, d]
        b_O = lm.b_O(layer)
        b = torch.zeros(u.shape[-1], dtype=dt) if b_O is None else b_O.detach().to(dt)
        name = p + "attn_out_norm"
        if not lm.has_norm(name):
            return A, u, None, b.expand(len(rows), -1)
        # each part through the norm with its scale frozen at the clean run's
        raw = torch.einsum("jhe,hed->jd", get(p + "attn.z"), W_O) + b
        scale = lm.norm_scale(name, raw)[rows].to(dt)  # [q, 1]
        ones = torch.ones(n, 1, dtype=dt)
        zero = lm.frozen_norm(name, torch.zeros_like(u[0]), ones).to(dt)
        u = torch.stack([lm.frozen_norm(name, u[h], ones).to(dt) - zero for h in range(H)])
        bias = lm.frozen_norm(name, b.expand(len(rows), -1), scale).to(dt)  # [q, d]
        return A, u, scale, bias

    node_rows: dict[tuple[str, int], set[int]] = {("x", L): set(roots)}

    for layer in reversed(range(L)):
        p = f"blocks.{layer}."
        out_rows = sorted(node_rows.get(("x", layer + 1), set()))
        if not out_rows:
            continue
        post = get(p + "resid_post")
        if parallel:
            att_rows = out_rows
            upd_target = {i: f"x{layer + 1}.{i}" for i in out_rows}
        else:
            mid = get(p + "resid_mid")
            y = post[out_rows]
            parts = torch.stack([mid[out_rows], get(p + "mlp.out")[out_rows]], 1)  # [q, 2, d]
            w = proximity_importance(y, parts)
            reached = set()
            for k, i in enumerate(out_rows):
                if w[k, 0] > tau:
                    add(f"m{layer}.{i}", f"x{layer + 1}.{i}", w[k, 0], "residual", layer)
                    reached.add(i)
                if w[k, 1] > tau:
                    add(f"m{layer}.{i}", f"x{layer + 1}.{i}", w[k, 1], "mlp", layer)
                    reached.add(i)
            dec_err = max(dec_err, float((parts.sum(1) - y).abs().max()))
            att_rows = sorted(reached)
            upd_target = {i: f"m{layer}.{i}" for i in att_rows}
            node_rows[("m", layer)] = set(att_rows)
        if not att_rows:
            continue
        x = get(p + "resid_pre")
        A_all, u, scale, bias_all = attention_parts(layer, att_rows)
        attn_out = get(p + "attn.out")
        sources: set[int] = set()
        y_all = post if parallel else get(p + "resid_mid")
        mlp_out = get(p + "mlp.out") if parallel else None
        for s in range(0, len(att_rows), chunk):
            rows = att_rows[s : s + chunk]
            q = len(rows)
            A = A_all[:, s : s + q]  # [H, q, n]
            y = y_all[rows]  # [q, d]
            z = A.permute(1, 0, 2)[..., None] * u[None]  # [q, H, n, d]
            if scale is not None:
                z = z * scale[s : s + q, None, None]
            if not per_head:
                z = z.sum(1, keepdim=True)  # [q, 1, n, d]
            pa = _prox(y[:, None, None], z)  # [q, H | 1, n]
            pr = _prox(y, x[rows])  # [q]
            pm = _prox(y, mlp_out[rows]) if mlp_out is not None else torch.zeros_like(pr)
            total = pa.sum((1, 2)) + pr + pm
            denom = torch.where(total > 0, total, torch.ones_like(total))
            wa, wr, wm = pa / denom[:, None, None], pr / denom, pm / denom
            # the parts plus the bias term rebuild the attention update
            rebuilt = z.sum((1, 2)) + bias_all[s : s + q]
            dec_err = max(dec_err, float((rebuilt - attn_out[rows]).abs().max()))
            for k, i in enumerate(rows):
                dst = upd_target[i]
                if wr[k] > tau:
                    add(f"x{layer}.{i}", dst, wr[k], "residual", layer)
                    sources.add(i)
                if mlp_out is not None and wm[k] > tau:
                    add(f"x{layer}.{i}", dst, wm[k], "mlp", layer)
                    sources.add(i)
                hh, jj = torch.nonzero(wa[k] > tau, as_tuple=True)
                for h, j in zip(hh.tolist(), jj.tolist()):
                    add(
                        f"x{layer}.{j}", dst, wa[k, h, j], "attention", layer, h if per_head else -1
                    )
                    sources.add(j)
        node_rows[("x", layer)] = node_rows.get(("x", layer), set()) | sources

    return _assemble(lm, batch, roots, edges, L, parallel, tau, per_head, dec_err)


def _assemble(lm: LM, batch: Any, roots: list[int], edges: dict[str, list[Any]], L: int,
              parallel: bool, tau: float, per_head: bool, dec_err: float) -> GraphResult:  # fmt: skip
    """Nodes, per-edge roots (which predictions reach each edge), the result."""
    toks = (
        lm.to_str_tokens(batch.input_ids[0])
        if lm.tokenizer is not None
        else [str(int(t)) for t in batch.input_ids[0]]
    )
    into: dict[str, list[int]] = {}
    for e, dst in enumerate(edges["target"]):
        into.setdefault(dst, []).append(e)
    edge_roots: list[list[int]] = [[] for _ in edges["source"]]
    node_ids: set[str] = set()
    for r in roots:
        stack, seen = [f"x{L}.{r}"], set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            for e in into.get(node, []):
                if r not in edge_roots[e]:
                    edge_roots[e].append(r)
                stack.append(edges["source"][e])
        node_ids |= seen
    keep = [e for e, rs in enumerate(edge_roots) if rs]  # edges no prediction reaches: dropped
    edges = {k: [v[e] for e in keep] for k, v in edges.items()}
    edges["roots"] = [sorted(edge_roots[e]) for e in keep]

    def key(node: str) -> tuple[float, int]:
        kind, rest = node[0], node[1:]
        layer, pos = rest.split(".")
        return (int(layer) + (0.5 if kind == "m" else 0.0), int(pos))

    ordered = sorted(node_ids, key=key)
    nodes: dict[str, list[Any]] = {"id": ordered, "kind": [], "layer": [], "level": [],
                                   "position": [], "token": []}  # fmt: skip
    for node in ordered:
        level, pos = key(node)
        nodes["kind"].append(node[0])
        nodes["layer"].append(int(level))
        nodes["level"].append(level)
        nodes["position"].append(pos)
        nodes["token"].append(toks[pos])
    return GraphResult(
        nodes, edges, method="routes",
        target="prediction at " + ", ".join(f"{r} ({toks[r]!r})" for r in roots),
        params={"tau": tau, "per_head": per_head, "positions": roots},
        model_id=lm.name, meta={"tokens": toks, "roots": roots, "n_layers": L,
                                "parallel": parallel},
        diagnostics={"decomposition_error": dec_err, "n_edges": len(edges["source"])},
    )  # fmt: skip
