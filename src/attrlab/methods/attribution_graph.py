"""Attribution graphs over a local replacement model (circuit-tracer style).

With per-layer transcoders in place of the MLPs, their feature activations and
reconstruction errors frozen at the clean run, and the attention patterns and
norm scales frozen (their backward is that of :mod:`attrlab.lrp`'s CP-LRP
rules: no gradient through the softmax, norm scales held constant), the model
is linear in its sources: token embeddings, active features (each writes
``a_i * W_dec[i]`` into the residual stream), error nodes (one per layer and
position) and transcoder biases. The **direct effect** of source ``s`` on
target ``t`` (a feature's pre-activation, or the target logit) is ``d t / d
g_s`` where ``g_s`` scales ``s``'s write: one backward pass per target row,
many targets per pass (the prompt is replicated, one target per copy), no
path through another feature (features are frozen inputs).

The graph is pruned by influence on the target: the indirect influence matrix
``B = A + A^2 + ...`` of the row-normalised absolute adjacency ``A`` gives each
node's influence; nodes are kept (largest first) until ``node_threshold`` of
the total influence is covered (and at most ``max_nodes``), then edges until
``edge_threshold`` of the kept edges' influence. Scores, as circuit-tracer
defines them: **replacement** = the fraction of the influence on the target
that reaches token embeddings over that reaching token embeddings or error
nodes (through any path); **completeness** = the non-error share of each node's
direct inputs, averaged with the nodes' influence (plus the target) as weights.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> tcs = [al.dictionaries.Dictionary.random(lm.cfg.d_model, 32, f"blocks.{l}.mlp.in",
    ...        f"blocks.{l}.mlp.out", activation="topk", k=4, seed=l) for l in range(lm.cfg.n_layers)]
    >>> g = attribution_graph(lm, "a b c", tcs, target=" a")
    >>> 0.0 <= g.diagnostics["replacement_score"] <= 1.0
    True
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from ..graph import GraphResult
from ..lrp import Composite, Gradient, Identity, Stop, propagation
from ..model.interventions import Intervention
from ..model.lock import holds_model_lock

__all__ = ["attribution_graph", "memory_estimate", "FROZEN"]

#: the replacement model's backward: softmax and norm scales frozen, everything else plain
FROZEN = Composite(linear=Gradient(), norm=Identity(), activation=Gradient(), softmax=Stop(),
                   attention_matmul=Gradient(), gated_product=Gradient())  # fmt: skip


def _check(lm: Any, transcoders: list[Any]) -> dict[int, Any]:
    by_layer = {}
    for d in transcoders:
        ok = (
            d.kind == "transcoder"
            and d.in_site.endswith(".mlp.in")
            and d.out_site.endswith(".mlp.out")
        )
        if not ok:
            raise InputError(
                "attribution graphs need per-layer transcoders blocks.l.mlp.in -> blocks.l.mlp.out"
            )
        layer = int(d.in_site.split(".")[1])
        if d.out_site != f"blocks.{layer}.mlp.out" or layer in by_layer:
            raise InputError(f"one transcoder per layer, reading and writing layer {layer}")
        if d.W_skip is not None:
            raise InputError("transcoders with a skip connection are not supported yet")
        by_layer[layer] = d
    missing = sorted(set(range(lm.cfg.n_layers)) - set(by_layer))
    if missing:
        raise InputError(
            f"the replacement model needs a transcoder on every layer; missing {missing}"
        )
    return by_layer


@holds_model_lock
def attribution_graph(
    lm: Any,
    prompt: Any,
    transcoders: list[Any],
    target: Any = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_nodes: int = 200,
    batch_size: int | None = None,
    max_feature_nodes: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = False,
) -> GraphResult:
    """The attribution graph of ``target`` (a token: its logit at the last
    position; None: the top prediction) on one prompt.

    Args:
        max_feature_nodes: compute the input rows of at most this many features
            (None: all active ones), chosen by their influence on the logit
            through the rows computed so far (the logit's row first), a batch at
            a time; other features stay sources without inputs. Bounds time and
            memory on long prompts.
        batch_size: target rows per backward (copies of the prompt); None: as
            many as fit ``memory_budget`` (:mod:`attrlab.model.budget`), at most 32.
        progress: a progress bar and the pre-flight memory estimate on stderr
            (printed anyway above 1 GiB).

    Returns:
        A :class:`~attrlab.graph.GraphResult`. Nodes: ``id`` (``emb.{p}``,
        ``f{l}.{i}@{p}``, ``err{l}@{p}``, ``tcbias{l}``, ``logit``), ``kind``,
        ``layer``, ``position``, ``feature``, ``activation``, ``influence``;
        edges: ``source``, ``target``, ``weight`` (the direct effect).
        ``diagnostics``: ``replacement_score``, ``completeness_score``, the
        unpruned sizes, and ``constant_terms_max``: the largest gap between a
        node's value (a feature's pre-activation without its encoder bias, the
        logit) and the sum of the direct effects into it — the model's own
        constant terms (attention / norm biases, learned position embeddings);
        0 up to float error for a model without them.
    """
    tcs = _check(lm, list(transcoders))
    L = lm.cfg.n_layers
    batch = lm.tokenize(prompt)
    if batch.shape[0] != 1:
        raise InputError("attribution graphs explain one prompt")
    P = batch.shape[1]
    from ..model.budget import batch_size_for

    batch_size = batch_size_for(lm, P, cap=32, grad=True, batch_size=batch_size,
                                memory_budget=memory_budget)  # fmt: skip
    sites = [f"blocks.{layer}.mlp.{s}" for layer in range(L) for s in ("in", "out")]
    with torch.no_grad():
        logits, cache = lm.run(batch, cache=sites)
    if target is None:
        tok = int(logits[0, -1].argmax())
    else:
        tid = lm.token_id(target) if isinstance(target, str) else int(target)
        tok = int(tid)
    dt = torch.promote_types(logits.dtype, torch.float32)
    acts, errs = [], []
    for layer in range(L):
        d = tcs[layer]
        x, y = cache[f"blocks.{layer}.mlp.in"][0].to(dt), cache[f"blocks.{layer}.mlp.out"][0].to(dt)
        a = d.encode(x)  # [P, W]
        acts.append(a)
        errs.append(y - d.decode(a, x))
    # nodes: sources (embeddings, features, errors, transcoder biases) and targets
    feats = [
        (layer, int(p), int(i)) for layer in range(L) for p, i in acts[layer].nonzero().tolist()
    ]
    n_emb, n_feat, n_err = P, len(feats), L * P
    n_src = n_emb + n_feat + n_err + L
    targets = [("feature", f) for f in feats] + [("logit", None)]
    budget = n_feat if max_feature_nodes is None else min(n_feat, int(max_feature_nodes))
    est = memory_estimate(lm, P, budget + 1, n_src, batch_size)
    if progress or est > 2**30:
        print(f"attribution graph: {n_feat} active features, {budget} rows of {n_src} sources; "
              f"about {est / 2**20:.0f} MB", file=sys.stderr)  # fmt: skip
    # direct effects, one row per computed target: slot 0 the logit, then features as computed
    A = torch.zeros(budget + 1, n_src, dtype=torch.float64)
    slot_of: list[int] = [-1]  # target (feature index, -1 = logit) of each slot
    A[0:1] = _direct_effects(lm, batch, tcs, acts, errs, targets[-1:], tok, dt)
    done = torch.zeros(n_feat, dtype=torch.bool)
    bar = tqdm(total=budget, disable=not progress, desc="graph rows", leave=False)
    while int(done.sum()) < budget:
        if budget == n_feat:
            todo = (~done).nonzero()[:, 0][:batch_size]
        else:
            inf = _influence(A[: len(slot_of)], slot_of, n_emb, n_feat)[n_emb : n_emb + n_feat]
            inf[done] = -1.0
            todo = torch.argsort(inf, descending=True)[: min(batch_size, budget - int(done.sum()))]
        chunk = [targets[int(k)] for k in todo]
        start = len(slot_of)
        A[start : start + len(todo)] = _direct_effects(lm, batch, tcs, acts, errs, chunk, tok, dt)
        slot_of += [int(k) for k in todo]
        done[todo] = True
        bar.update(len(todo))
    bar.close()
    # each target's value without its own encoder bias (a constant no source explains)
    pre = [
        float(
            tcs[la].pre_activation(cache[f"blocks.{la}.mlp.in"][0, p].to(dt))[i] - tcs[la].b_enc[i]
        )
        for la, p, i in feats
    ]
    values = torch.tensor(pre + [float(logits[0, -1, tok])], dtype=torch.float64)
    g = _graph(lm, batch, tok, feats, acts, A, slot_of, values, node_threshold, edge_threshold,
               max_nodes, (n_emb, n_feat, n_err, L))  # fmt: skip
    g.diagnostics.update({"n_feature_rows": int(done.sum()), "memory_estimate_bytes": est})
    g.params["max_feature_nodes"] = max_feature_nodes
    return g


def memory_estimate(lm: Any, n_pos: int, n_rows: int, n_src: int, batch_size: int) -> int:
    """Bytes a graph build needs: the adjacency rows (float64) plus one backward
    batch (``batch_size`` copies of the prompt, the activations autograd keeps
    per layer, about 24 ``d_model``-wide tensors and the attention weights).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> memory_estimate(lm, 16, 100, 1000, 8) > 100 * 1000 * 8
        True
    """
    c = lm.cfg
    item = 4 if lm.dtype != torch.float64 else 8
    acts = batch_size * n_pos * c.n_layers * (24 * c.d_model + 2 * c.d_mlp + 2 * c.n_heads * n_pos)
    return int(n_rows * n_src * 8 + acts * item)


def _influence(A: Tensor, slot_of: list[int], n_emb: int, n_feat: int) -> Tensor:
    """Influence on the logit of every source ``[n_src]`` through the computed rows
    ``A [slots, n_src]`` (row-normalised absolute direct effects, all path lengths)."""
    W = A.abs()
    W = W / W.sum(1, keepdim=True).clamp_min(1e-30)
    slot = {f: k for k, f in enumerate(slot_of) if f >= 0}  # feature -> its row
    feat_slots = torch.tensor([slot.get(f, -1) for f in range(n_feat)], dtype=torch.long)
    has_row = feat_slots >= 0
    v = torch.zeros(len(slot_of), dtype=torch.float64)
    v[0] = 1.0  # the logit
    inf = torch.zeros(A.shape[1], dtype=torch.float64)
    for _ in range(256):
        step = v @ W  # [n_src]
        inf += step
        v = torch.zeros(len(slot_of), dtype=torch.float64)
        v[feat_slots[has_row]] = step[n_emb : n_emb + n_feat][has_row]
        if float(v.abs().sum()) < 1e-12:
            break
    return inf


def _direct_effects(lm: Any, batch: Any, tcs: dict[int, Any], acts: list[Tensor], errs: list[Tensor],
                    chunk: list[tuple[str, Any]], tok: int, dt: Any) -> Tensor:  # fmt: skip
    """``[len(chunk), n_src]``: one copy of the prompt per target, one backward."""
    L, P = len(acts), batch.shape[1]
    R = len(chunk)
    rows = batch.repeat(R)
    g_emb = torch.ones(R, P, dtype=dt, requires_grad=True)
    g_feat = [torch.ones(R, *a.shape, dtype=dt, requires_grad=True) for a in acts]
    g_err = [torch.ones(R, P, dtype=dt, requires_grad=True) for _ in range(L)]
    g_bias = torch.ones(R, L, dtype=dt, requires_grad=True)
    live_in: dict[int, Tensor] = {}

    def embed(e: Tensor) -> Tensor:
        return e * g_emb.to(e.dtype)[..., None]

    def record(layer: int) -> Any:
        def fn(x: Tensor) -> Tensor:
            live_in[layer] = x
            return x

        return fn

    def replace(layer: int) -> Any:
        d = tcs[layer]
        W = d.W_dec.to(dt)
        b = d.b_dec.to(dt)

        def fn(y: Tensor) -> Tensor:
            out = (acts[layer][None] * g_feat[layer]) @ W + errs[layer][None] * g_err[layer][
                ..., None
            ]
            out = out + g_bias[:, layer, None, None] * b
            return out.to(y.dtype)

        return fn

    ivs = [Intervention("embed", embed)]
    for layer in range(L):
        ivs.append(Intervention(f"blocks.{layer}.mlp.in", record(layer)))
        ivs.append(Intervention(f"blocks.{layer}.mlp.out", replace(layer)))
    with torch.enable_grad(), propagation(lm, FROZEN):
        logits, _ = lm.run(rows, interventions=ivs, grad=True)
        outs = []
        for r, (kind, f) in enumerate(chunk):
            if kind == "logit":
                outs.append(logits[r, -1, tok].to(dt))
            else:
                layer, p, i = f
                d = tcs[layer]
                x = live_in[layer][r, p].to(dt)
                outs.append(d.pre_activation(x)[i])
        total = torch.stack(outs).sum()
        grads = torch.autograd.grad(total, [g_emb, *g_feat, *g_err, g_bias], allow_unused=True)
    ge = grads[0]
    gf = grads[1 : 1 + L]
    gr = grads[1 + L : 1 + 2 * L]
    gb = grads[1 + 2 * L]
    cols = [ge if ge is not None else torch.zeros(R, P)]
    for layer in range(L):
        g = gf[layer] if gf[layer] is not None else torch.zeros(R, *acts[layer].shape)
        nz = acts[layer].nonzero()
        cols.append(g[:, nz[:, 0], nz[:, 1]])
    for layer in range(L):
        cols.append(gr[layer] if gr[layer] is not None else torch.zeros(R, P))
    cols.append(gb if gb is not None else torch.zeros(R, L))
    return torch.cat([c.detach().double().cpu() for c in cols], 1)


def _graph(lm: Any, batch: Any, tok: int, feats: list[tuple[int, int, int]], acts: list[Tensor],
           A_t: Tensor, slot_of: list[int], values: Tensor, node_threshold: float, edge_threshold: float,
           max_nodes: int, sizes: tuple[int, int, int, int]) -> GraphResult:  # fmt: skip
    """Prune by influence and build the graph result."""
    n_emb, n_feat, n_err, L = sizes
    P = n_emb
    toks = (
        lm.to_str_tokens(batch.input_ids[0])
        if lm.tokenizer is not None
        else [str(int(t)) for t in batch.input_ids[0]]
    )
    n_src = A_t.shape[1]
    N = n_src + 1  # + the logit node
    logit = N - 1
    # rows: the targets whose inputs were computed (slot 0: the logit)
    row_node = torch.tensor([logit if f < 0 else n_emb + f for f in slot_of], dtype=torch.long)
    W = A_t.abs()
    Wn = W / W.sum(1, keepdim=True).clamp_min(1e-30)
    inf = torch.cat([_influence(A_t, slot_of, n_emb, n_feat), torch.zeros(1, dtype=torch.float64)])
    is_err = torch.zeros(N, dtype=torch.bool)
    is_err[n_emb + n_feat : n_emb + n_feat + n_err] = True
    tok_inf, err_inf = inf[:n_emb].sum(), inf[is_err].sum()
    replacement = float(tok_inf / (tok_inf + err_inf).clamp_min(1e-30))
    row_err = Wn[:, is_err[:n_src]].sum(1)  # [rows]
    weight_t = torch.where(row_node == logit, torch.ones(len(row_node), dtype=torch.float64),
                           inf[row_node])  # fmt: skip
    w_rows = weight_t * (W.sum(1) > 0)
    completeness = float(((1 - row_err) * w_rows).sum() / w_rows.sum().clamp_min(1e-30))
    # node pruning by influence until node_threshold of the total (and max_nodes)
    order = torch.argsort(inf, descending=True)
    total = float(inf.sum())
    keep = torch.zeros(N, dtype=torch.bool)
    keep[logit] = True
    acc = 0.0
    for idx in order.tolist():
        if acc >= node_threshold * total or int(keep.sum()) >= max_nodes or inf[idx] <= 0:
            break
        keep[idx] = True
        acc += float(inf[idx])
    # edge pruning among kept nodes: |effect| x the target's influence, cumulative
    sub = W * keep[row_node][:, None] * keep[:n_src][None, :]
    score = sub * weight_t[:, None].clamp_min(0)
    flat = score.flatten()
    idx = torch.argsort(flat, descending=True)
    csum = torch.cumsum(flat[idx], 0)
    n_keep = int((csum < edge_threshold * float(flat.sum())).sum()) + 1
    chosen = idx[: min(n_keep, int((flat > 0).sum()))]

    # node table
    def node(k: int) -> dict[str, Any]:
        if k < n_emb:
            return {"id": f"emb.{k}", "kind": "embedding", "layer": -1, "position": k, "feature": -1,
                    "activation": 0.0}  # fmt: skip
        if k < n_emb + n_feat:
            layer, p, i = feats[k - n_emb]
            return {"id": f"f{layer}.{i}@{p}", "kind": "feature", "layer": layer, "position": p,
                    "feature": i, "activation": float(acts[layer][p, i])}  # fmt: skip
        if k < n_emb + n_feat + n_err:
            j = k - n_emb - n_feat
            return {"id": f"err{j // P}@{j % P}", "kind": "error", "layer": j // P,
                    "position": j % P, "feature": -1, "activation": 0.0}  # fmt: skip
        if k < n_src:
            layer = k - n_emb - n_feat - n_err
            return {"id": f"tcbias{layer}", "kind": "bias", "layer": layer, "position": -1,
                    "feature": -1, "activation": 0.0}  # fmt: skip
        return {"id": "logit", "kind": "logit", "layer": L, "position": P - 1, "feature": -1,
                "activation": 0.0}  # fmt: skip

    pairs = [(int(row_node[int(i) // n_src]), int(i) % n_src) for i in chosen]
    used = sorted({t for t, _ in pairs} | {s_ for _, s_ in pairs} | {logit})
    rows = [node(k) for k in used]
    nodes: dict[str, list[Any]] = {c: [r[c] for r in rows] for c in rows[0]}
    nodes["influence"] = [float(inf[k]) if k != logit else 1.0 for k in used]
    nodes["level"] = [r["layer"] + (1 if r["kind"] != "embedding" else 0) for r in rows]
    nodes["token"] = [toks[r["position"]] if r["position"] >= 0 else "" for r in rows]
    ids = {k: node(k)["id"] for k in used}
    edges: dict[str, list[Any]] = {"source": [], "target": [], "weight": [], "kind": []}
    for (t, src), flat_i in zip(pairs, chosen.tolist()):
        edges["source"].append(ids[src])
        edges["target"].append(ids[t])
        edges["weight"].append(float(A_t[int(flat_i) // n_src, src]))
        edges["kind"].append(node(src)["kind"])
    # what the sources do not explain: the model's own constant terms (attention and norm
    # biases, learned position embeddings); 0 up to float error for a model without them
    other = values[[len(values) - 1 if f < 0 else f for f in slot_of]] - A_t.sum(1)
    return GraphResult(
        nodes, edges, method="attribution_graph", target=f"logit({lm.to_str_tokens([tok])[0]!r})"
        if lm.tokenizer is not None else f"logit({tok})",
        params={"node_threshold": node_threshold, "edge_threshold": edge_threshold,
                "max_nodes": max_nodes},
        model_id=str(lm.name),
        meta={"tokens": toks, "n_sources": n_src, "ids": batch.input_ids[0].tolist(),
              "target_id": tok},  # fmt: skip
        diagnostics={"replacement_score": replacement, "completeness_score": completeness,
                     "n_features": n_feat, "n_nodes_unpruned": N,
                     "constant_terms_max": float(other.abs().max())},
    )  # fmt: skip
