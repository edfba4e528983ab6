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
direct inputs, averaged with the nodes' influence (plus the target) as weights,
nodes without inputs (tokens, errors) counting as complete. Both agree with
the ``circuit-tracer`` package on the same model and transcoders
(``benchmarks/bench_graph_parity.py``).

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

import math
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError, NonFiniteError
from ..graph import GraphResult
from ..lrp import Composite, Gradient, Identity, Stop, propagation
from ..model.budget import peak_rss_growth
from ..model.interventions import Intervention
from ..model.lock import holds_model_lock

__all__ = ["attribution_graph", "memory_estimate", "FROZEN"]

#: the replacement model's backward: softmax and norm scales frozen, everything else plain
FROZEN = Composite(linear=Gradient(), norm=Identity(), activation=Gradient(), softmax=Stop(),
                   attention_matmul=Gradient(), gated_product=Gradient())  # fmt: skip


@dataclass
class _Layer:
    """One layer of the replacement model, whatever the transcoders' kind:
    its features (read at ``read_site``), their decoders into the MLP outputs
    of this and (cross-layer) later layers, and the decoder bias and skip of
    this layer's MLP output."""

    read_site: str
    pre_activation: Callable[[Tensor], Tensor]  # [..., d] -> [..., width] (with b_enc)
    activate: Callable[[Tensor], Tensor]
    b_enc: Tensor  # [width]
    writes: dict[int, Tensor]  # output layer -> W_dec [width, d_model]
    b_out: Tensor  # this layer's output bias [d_model]
    W_skip: Tensor | None

    @property
    def width(self) -> int:
        return int(self.b_enc.shape[0])

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.pre_activation(x))


def _read_site(site: str) -> str:
    """Where a transcoder's input is read: its site (``resid_mid``, what the
    MLP's norm reads in a sequential block, is read as ``mlp.in``)."""
    return site.replace(".resid_mid", ".mlp.in")


_READS = (".mlp.in", ".mlp.normed", ".resid_mid")


def _check(lm: Any, transcoders: Any) -> dict[int, _Layer]:
    """Per-layer transcoders (one per layer) or one cross-layer transcoder, as
    :class:`_Layer` views of every layer."""
    from ..dictionaries.clt import CrossLayerTranscoder

    L = lm.cfg.n_layers
    if isinstance(transcoders, CrossLayerTranscoder):
        c = transcoders
        if list(c.layers) != list(range(L)):
            raise InputError(f"a cross-layer transcoder must cover layers 0..{L - 1}; "
                             f"this one covers {list(c.layers)}")  # fmt: skip
        out = {}
        for la in range(L):
            W_enc, b_enc = c.W_enc[la], c.b_enc[la]
            th = None if c.threshold is None else c.threshold[la]

            def pre(x: Tensor, W: Tensor = W_enc, b: Tensor = b_enc) -> Tensor:
                return x @ W.to(x.device, x.dtype) + b.to(x.device, x.dtype)

            def act(z: Tensor, th: Tensor | None = th) -> Tensor:
                if c.activation == "jumprelu":
                    assert th is not None
                    return torch.where(z > th.to(z.device, z.dtype), z, torch.zeros_like(z))
                if c.activation == "topk":
                    top = z.topk(int(c.k or 1), dim=-1)
                    return torch.zeros_like(z).scatter(-1, top.indices, top.values.clamp_min(0))
                return z.clamp_min(0)

            writes = {j: c.W_dec[la][:, j - la] for j in range(la, L)}
            out[la] = _Layer(c.in_sites[la], pre, act, b_enc, writes, c.b_dec[la], None)
        return out
    by_layer: dict[int, _Layer] = {}
    for d in list(transcoders):
        ok = (
            getattr(d, "kind", None) == "transcoder"
            and d.in_site.endswith(_READS)
            and d.out_site.endswith(".mlp.out")
        )
        if not ok:
            raise InputError(
                "attribution graphs need per-layer transcoders reading blocks.l.mlp.in, "
                "blocks.l.mlp.normed or blocks.l.resid_mid and writing blocks.l.mlp.out, "
                "or one cross-layer transcoder (al.dictionaries.CrossLayerTranscoder)"
            )
        layer = int(d.in_site.split(".")[1])
        if d.out_site != f"blocks.{layer}.mlp.out" or layer in by_layer:
            raise InputError(f"one transcoder per layer, reading and writing layer {layer}")
        by_layer[layer] = _Layer(d.in_site, d.pre_activation, d.activate, d.b_enc,
                                 {layer: d.W_dec}, d.b_dec, d.W_skip)  # fmt: skip
    missing = sorted(set(range(L)) - set(by_layer))
    if missing:
        raise InputError(
            f"the replacement model needs a transcoder on every layer; missing {missing}"
        )
    return by_layer


def _reconstruct(tcs: dict[int, _Layer], acts: list[Tensor], xs: list[Tensor], j: int) -> Tensor:
    """Layer ``j``'s MLP output as the transcoders write it ``[P, d_model]``."""
    out = tcs[j].b_out.to(acts[j].dtype) + sum(
        acts[la] @ tcs[la].writes[j].to(acts[la].dtype)
        for la in range(j + 1)
        if j in tcs[la].writes
    )
    skip = tcs[j].W_skip
    if skip is not None:
        out = out + xs[j] @ skip.to(xs[j].dtype)
    return out


@holds_model_lock
def attribution_graph(
    lm: Any,
    prompt: Any,
    transcoders: Any,
    target: Any = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_nodes: int = 200,
    batch_size: int | None = None,
    max_feature_nodes: int | None = None,
    memory_budget: int | str | None = None,
    head_loadings: bool = False,
    progress: bool = False,
) -> GraphResult:
    """The attribution graph of ``target`` (a token: its logit at the last
    position; a pair ``(answer, wrong)``: the logit difference; None: the top
    prediction) on one prompt.

    Args:
        transcoders: per-layer transcoders (one per layer, reading
            ``blocks.l.mlp.in`` / ``mlp.normed`` / ``resid_mid``, writing
            ``blocks.l.mlp.out``), or one
            :class:`~attrlab.dictionaries.CrossLayerTranscoder` (features read at
            layer ``l`` write to the MLP outputs of layers ``l..L-1``).
        max_feature_nodes: compute the input rows of at most this many features
            (None: all active ones), chosen by their influence on the logit
            through the rows computed so far (the logit's row first), a batch at
            a time; other features stay sources without inputs. Bounds time and
            memory on long prompts.
        batch_size: target rows per backward (copies of the prompt); None: as
            many as fit ``memory_budget`` (:mod:`attrlab.model.budget`), at most 32.
        head_loadings: split every kept edge by the attention head it passes
            through last (``tables["head_loadings"]``: ``source``, ``target``,
            ``layer``, ``head``, ``weight``; ``layer = head = -1`` is the part
            that reaches the target through the residual stream alone, zero for
            an edge between two positions). The rows of an edge sum to its
            weight. Costs one backward row per target node and one per target
            node, layer below it and head.
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
    tcs = _check(lm, transcoders)
    L = lm.cfg.n_layers
    batch = lm.tokenize(prompt)
    if batch.shape[0] != 1:
        raise InputError("attribution graphs explain one prompt")
    P = batch.shape[1]
    from ..model.budget import batch_size_for

    batch_size = batch_size_for(lm, P, cap=32, grad=True, batch_size=batch_size,
                                memory_budget=memory_budget)  # fmt: skip
    sites = [s for la in range(L) for s in (_read_site(tcs[la].read_site), f"blocks.{la}.mlp.out")]
    with torch.no_grad():
        logits, cache = lm.run(batch, cache=sites)
    tok, wrong = _target_tokens(lm, target, logits)
    dt = torch.promote_types(logits.dtype, torch.float32)
    xs = [cache[_read_site(tcs[la].read_site)][0].to(dt) for la in range(L)]  # [P, d_model]
    acts = [tcs[la].encode(xs[la]) for la in range(L)]  # [P, width]
    errs = [
        cache[f"blocks.{j}.mlp.out"][0].to(dt) - _reconstruct(tcs, acts, xs, j) for j in range(L)
    ]
    # nodes: sources (embeddings, features, errors, transcoder biases) and targets
    feats = [
        (layer, int(p), int(i)) for layer in range(L) for p, i in acts[layer].nonzero().tolist()
    ]
    n_emb, n_feat, n_err = P, len(feats), L * P
    n_src = n_emb + n_feat + n_err + L
    targets = [("feature", f) for f in feats] + [("logit", None)]
    budget = n_feat if max_feature_nodes is None else min(n_feat, int(max_feature_nodes))
    # direct effects, one row per computed target: slot 0 the logit, then features as computed;
    # the logit's row, run first on a few copies, also measures the memory a copy takes
    A = torch.zeros(budget + 1, n_src, dtype=torch.float64)
    slot_of: list[int] = [-1]  # target (feature index, -1 = logit) of each slot
    args = (lm, batch, tcs, acts, errs)
    copies = min(batch_size, max(budget, 1))

    trial = min(4, copies)

    def preflight() -> Tensor:  # the logit's row, on a few copies: a measured cost per copy
        with _Replacement(*args, trial, dt) as run:
            return run.rows(_reader(targets[-1:], tcs, (tok, wrong), dt), 1)

    A[0:1], grew = peak_rss_growth(preflight)
    est = memory_estimate(lm, P, budget + 1, n_src, copies,
                          copy_bytes=None if grew is None else grew // trial,
                          width=max(d.width for d in tcs.values()))  # fmt: skip
    if progress or est > 2**30:
        print(f"attribution graph: {n_feat} active features, {budget} rows of {n_src} sources; "
              f"about {est / 2**20:.0f} MB", file=sys.stderr)  # fmt: skip
    done = torch.zeros(n_feat, dtype=torch.bool)
    bar = tqdm(total=budget, disable=not progress, desc="graph rows", leave=False)
    with ExitStack() as stack:
        if budget:  # one forward, every row's backward
            run = stack.enter_context(_Replacement(*args, copies, dt))
        while int(done.sum()) < budget:
            if budget == n_feat:
                todo = (~done).nonzero()[:, 0][:batch_size]
            else:
                inf = _influence(A[: len(slot_of)], slot_of, n_emb, n_feat)[n_emb : n_emb + n_feat]
                inf[done] = -1.0
                n_todo = min(batch_size, budget - int(done.sum()))
                todo = torch.argsort(inf, descending=True)[:n_todo]
            chunk = [targets[int(k)] for k in todo]
            start = len(slot_of)
            A[start : start + len(todo)] = run.rows(
                _reader(chunk, tcs, (tok, wrong), dt), len(chunk)
            )
            slot_of += [int(k) for k in todo]
            done[todo] = True
            bar.update(len(todo))
    bar.close()
    # each target's value without its own encoder bias (a constant no source explains)
    pre_all = [tcs[la].pre_activation(xs[la]) - tcs[la].b_enc.to(dt) for la in range(L)]  # [P, W]
    pre = [float(pre_all[la][p, i]) for la, p, i in feats]
    clean = logits[0, -1, tok] - (logits[0, -1, wrong] if wrong is not None else 0.0)
    values = torch.tensor(pre + [float(clean)], dtype=torch.float64)
    g, pairs = _graph(lm, batch, (tok, wrong), feats, acts, A, slot_of, values, node_threshold,
                      edge_threshold, max_nodes, (n_emb, n_feat, n_err, L))  # fmt: skip
    if head_loadings:
        g.tables["head_loadings"] = _head_loadings(lm, batch, tcs, acts, errs, (tok, wrong), dt, targets,
                                                   pairs, g, batch_size, progress)  # fmt: skip
    g.diagnostics.update({"n_feature_rows": int(done.sum()), "memory_estimate_bytes": est})
    g.params["max_feature_nodes"] = max_feature_nodes
    return g


def memory_estimate(lm: Any, n_pos: int, n_rows: int, n_src: int, copies: int,
                    copy_bytes: int | None = None, width: int | None = None) -> int:  # fmt: skip
    """Peak bytes a graph build adds: the adjacency rows (float64) and one
    absolute copy of them while pruning, the clean run's logits, and the run
    of ``copies`` copies of the prompt whose graph every row's backward reuses.

    Args:
        copy_bytes: the peak memory one copy adds, as measured
            (:func:`attribution_graph` runs the logit's row on four copies under
            :func:`attrlab.model.budget.peak_rss_growth`); None: a guess from the
            config (activations kept per layer and position, attention scores,
            one layer's dense feature activations, the gates).
        width: the widest transcoder (None: 4 x d_model).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> memory_estimate(lm, 16, 100, 1000, 8) > 2 * 100 * 1000 * 8
        True
    """
    c = lm.cfg
    item = 8 if lm.dtype == torch.float64 else 4
    if copy_bytes is None:
        width = 4 * c.d_model if width is None else width
        kept = n_pos * c.n_layers * (12 * c.d_model + 2 * c.n_heads * n_pos) * item
        copy_bytes = kept + 4 * n_pos * width * item + n_src * (2 * item + 16)
    adjacency = 2 * n_rows * n_src * 8
    logits = n_pos * c.d_vocab * 4
    return int(adjacency + logits + copies * copy_bytes)


def _target_tokens(lm: Any, target: Any, logits: Tensor) -> tuple[int, int | None]:
    """``(answer, wrong)`` token ids: a token (its logit), a pair (the logit
    difference), None (the top prediction)."""

    def one(t: Any) -> int:
        if isinstance(t, str):
            return int(lm.token_id(t))
        if isinstance(t, int) and not isinstance(t, bool) and 0 <= t < logits.shape[-1]:
            return t
        raise InputError(
            f"a graph target is a token (str or id), a pair of them, or None; got {t!r}"
        )

    if target is None:
        return int(logits[0, -1].argmax()), None
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise InputError("a pair target is (answer, wrong): the logit difference")
        return one(target[0]), one(target[1])
    return one(target), None


def _target_label(lm: Any, tok: tuple[int, int | None]) -> str:
    def name(t: int) -> str:
        return repr(lm.to_str_tokens([t])[0]) if lm.tokenizer is not None else str(t)

    answer, wrong = tok
    return (
        f"logit({name(answer)})" if wrong is None else f"logit_diff({name(answer)}, {name(wrong)})"
    )


def _influence(A: Tensor, slot_of: list[int], n_emb: int, n_feat: int) -> Tensor:
    """Influence on the logit of every source ``[n_src]`` through the computed rows
    ``A [slots, n_src]`` (row-normalised absolute direct effects, all path lengths)."""
    W = A.abs()  # the one copy of the rows: normalised in place
    W /= W.sum(1, keepdim=True).clamp_min(1e-30)
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


def _reader(chunk: list[tuple[str, Any]], tcs: dict[int, Any], tok: tuple[int, int | None],
            dt: Any) -> Any:  # fmt: skip
    """A readout for :meth:`_Replacement.rows`: row ``r`` reads target ``chunk[r]``."""

    def readout(r: int, logits: Tensor, rec: dict[str, Tensor]) -> Tensor:
        return _target_value(chunk[r], r, logits, rec, tcs, tok, dt)

    return readout


def _head_loadings(lm: Any, batch: Any, tcs: dict[int, Any], acts: list[Tensor],
                   errs: list[Tensor], tok: tuple[int, int | None], dt: Any, targets: list[tuple[str, Any]],
                   pairs: list[tuple[int, int, str, str, float]], g: GraphResult,
                   batch_size: int, progress: bool) -> dict[str, list[Any]]:  # fmt: skip
    """Each kept edge split by the attention head it passes through last.

    For a target ``t`` let ``u_l = d t / d attn_out_l`` along the residual stream
    alone (attention outputs detached: no later head on the path). The part of
    an edge ``s -> t`` whose last attention hop is head ``h`` of layer ``l`` is
    ``d (u_l . head_out_{l,h}) / d g_s`` in the replacement model; over all heads
    plus the attention-free path it sums to the edge's direct effect, since the
    replacement model is linear in its sources."""
    n_emb, logit = batch.shape[1], int(g.meta["n_sources"])  # node index: sources, then the logit
    node_target = {k: targets[-1] if k == logit else targets[k - n_emb] for k, *_ in pairs}
    tnodes = sorted(node_target)
    H, P = lm.cfg.n_heads, batch.shape[1]
    n = max(1, min(batch_size, len(tnodes)))
    args = (lm, batch, tcs, acts, errs)
    # u[t, l] = d t / d attn_out_l at t's position through the residual stream alone
    # (zero at every other position: no attention on the path) [targets, L, d_model]
    u = torch.zeros(len(tnodes), len(acts), lm.cfg.d_model, dtype=torch.float64)
    where = [P - 1 if node_target[k][0] == "logit" else node_target[k][1][1] for k in tnodes]
    with _Replacement(*args, n, dt, probe_attention=True) as run:
        for c0 in range(0, len(tnodes), n):
            chunk = [node_target[k] for k in tnodes[c0 : c0 + n]]
            grads = run.rows(_reader(chunk, tcs, tok, dt), len(chunk))  # [R, L, P, d_model]
            for r in range(len(chunk)):
                u[c0 + r] = grads[r, :, where[c0 + r]]
    jobs = [(t, la, h) for t in range(len(tnodes)) for la in range(len(acts))
            if bool(u[t, la].abs().amax() > 0) for h in range(H)]  # fmt: skip
    loads: dict[tuple[int, int, int], Tensor] = {}
    bar = tqdm(total=len(jobs), disable=not progress, desc="head loadings", leave=False)
    with _Replacement(*args, max(1, min(batch_size, len(jobs))), dt, record_heads=True) as run:
        for j0 in range(0, len(jobs), run.copies):
            part = jobs[j0 : j0 + run.copies]

            def read_head(
                r: int, logits: Tensor, rec: dict[str, Tensor], part: Any = part
            ) -> Tensor:
                t, la, h = part[r]
                return (u[t, la].to(dt) * rec[f"heads{la}"][r, where[t], h].to(dt)).sum()

            rows = run.rows(read_head, len(part))
            loads.update({job: rows[r] for r, job in enumerate(part)})
            bar.update(len(part))
    bar.close()
    out: dict[str, list[Any]] = {c: [] for c in ("source", "target", "layer", "head", "weight")}
    slot = {k: t for t, k in enumerate(tnodes)}
    by_target: dict[int, list[tuple[int, int, Tensor]]] = {}
    for (t, la, h), row in sorted(loads.items(), key=lambda kv: kv[0]):
        by_target.setdefault(t, []).append((la, h, row))
    for tn, src, tid, sid, w in pairs:
        split = [(la, h, float(row[src])) for la, h, row in by_target.get(slot[tn], [])]
        split = [(la, h, x) for la, h, x in split if x != 0.0]
        split.append((-1, -1, w - sum(x for *_, x in split)))
        for la, h, x in split:
            out["source"].append(sid)
            out["target"].append(tid)
            out["layer"].append(la)
            out["head"].append(h)
            out["weight"].append(x)
    if not all(math.isfinite(x) for x in out["weight"]):
        raise NonFiniteError("head loadings are not finite")
    return out


def _target_value(target: tuple[str, Any], r: int, logits: Tensor, rec: dict[str, Tensor],
                  tcs: dict[int, Any], tok: tuple[int, int | None], dt: Any) -> Tensor:  # fmt: skip
    """Row ``r``'s value of a target node: the logit (or logit difference
    ``tok = (answer, wrong)``), or a feature's pre-activation."""
    kind, f = target
    if kind == "logit":
        answer, wrong = tok
        value = logits[r, -1, answer].to(dt)
        return value if wrong is None else value - logits[r, -1, wrong].to(dt)
    layer, p, i = f
    return tcs[layer].pre_activation(rec[f"in{layer}"][r, p].to(dt))[i]


class _Replacement:
    """``copies`` copies of the prompt run once through the local replacement
    model (MLPs replaced by the frozen features' writes, errors and biases;
    softmax and norm scales frozen), the autograd graph kept for many backward
    passes: :meth:`rows` back-propagates ``readout(r, logits, rec)`` of rows
    ``r < n`` (one target per copy).

    ``rec`` holds each layer's live transcoder input (``in{l}``, ``[copies, P,
    d_model]``) and, with ``record_heads``, per-head attention output
    (``heads{l}``, ``[copies, P, head, d_model]``). :meth:`rows` returns the
    gradient on every source's gate ``[n, n_src]`` (embeddings, active features,
    errors, transcoder biases), or with ``probe_attention`` on a probe added to
    each layer's attention output, the attention outputs themselves detached
    (paths through the residual stream alone) ``[n, L, P, d_model]``.
    """

    def __init__(self, lm: Any, batch: Any, tcs: dict[int, Any], acts: list[Tensor],
                 errs: list[Tensor], copies: int, dt: Any, probe_attention: bool = False,
                 record_heads: bool = False):  # fmt: skip
        self.lm, self.batch, self.tcs, self.acts, self.errs = lm, batch, tcs, acts, errs
        self.copies, self.dt = copies, dt
        self.probe_attention, self.record_heads = probe_attention, record_heads
        self._stack = ExitStack()

    def __enter__(self) -> _Replacement:
        lm, tcs, acts, errs, dt, R = self.lm, self.tcs, self.acts, self.errs, self.dt, self.copies
        L, P = len(acts), self.batch.shape[1]
        active = [a.nonzero(as_tuple=True) for a in acts]  # (positions, features) per layer
        g_emb = torch.ones(R, P, dtype=dt, requires_grad=True)
        g_feat = [torch.ones(R, len(p), dtype=dt, requires_grad=True) for p, _ in active]
        g_err = [torch.ones(R, P, dtype=dt, requires_grad=True) for _ in range(L)]
        g_bias = torch.ones(R, L, dtype=dt, requires_grad=True)
        probes = [torch.zeros(R, P, lm.cfg.d_model, dtype=dt, requires_grad=True) for _ in range(L)]
        rec: dict[str, Tensor] = {}

        def embed(e: Tensor) -> Tensor:
            return e * g_emb.to(e.dtype)[..., None]

        def record(key: str) -> Any:
            def fn(x: Tensor) -> Tensor:
                rec[key] = x
                return x

            return fn

        gated: dict[int, Tensor] = {}  # layer -> its features' gated activations [R, P, width]

        def replace(j: int) -> Any:
            d = tcs[j]

            def fn(y: Tensor) -> Tensor:
                pos, feat = active[j]
                g = torch.zeros(R, *acts[j].shape, dtype=dt)
                g[:, pos, feat] = acts[j][pos, feat] * g_feat[j]
                if max(d.writes) > j:  # a cross-layer transcoder: later layers read it too
                    gated[j] = g
                out = errs[j][None] * g_err[j][..., None] + g_bias[:, j, None, None] * d.b_out.to(
                    dt
                )
                out = out + g @ d.writes[j].to(dt)
                for la in range(j):  # earlier layers' features (cross-layer transcoders)
                    if j in tcs[la].writes:
                        out = out + gated[la] @ tcs[la].writes[j].to(dt)
                if d.W_skip is not None:  # a linear path from the live input, not a node
                    out = out + rec[f"in{j}"].to(dt) @ d.W_skip.to(dt)
                if j == L - 1:
                    gated.clear()
                return out.to(y.dtype)

            return fn

        def probe(layer: int) -> Any:
            return lambda y: y.detach() + probes[layer].to(y.dtype)

        ivs = [Intervention("embed", embed)]
        for layer in range(L):
            ivs.append(Intervention(_read_site(tcs[layer].read_site), record(f"in{layer}")))
            ivs.append(Intervention(f"blocks.{layer}.mlp.out", replace(layer)))
            if self.probe_attention:
                ivs.append(Intervention(f"blocks.{layer}.attn.out", probe(layer)))
            if self.record_heads:
                ivs.append(Intervention(f"blocks.{layer}.attn.head_out", record(f"heads{layer}")))
        self.leaves = probes if self.probe_attention else [g_emb, *g_feat, *g_err, g_bias]
        self._stack.enter_context(torch.enable_grad())
        self._stack.enter_context(propagation(lm, FROZEN))
        self._stack.enter_context(lm.mlps_skipped())  # their outputs are replaced: skip the work
        rows = self.batch.repeat(R)
        self.logits, _ = lm.run(rows, interventions=ivs, grad=True, last_only=True)
        self.rec = rec
        return self

    def rows(self, readout: Any, n: int) -> Tensor:
        """Back-propagate ``readout`` of rows ``0..n-1`` (``n <= copies``)."""
        total = torch.stack([readout(r, self.logits, self.rec) for r in range(n)]).sum()
        grads = torch.autograd.grad(total, self.leaves, allow_unused=True, retain_graph=True)
        grads = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, self.leaves))
        if self.probe_attention:
            return torch.stack([g[:n].detach().double() for g in grads], 1)
        # columns in node order: embeddings, features (layer, position, feature), errors, biases
        return torch.cat([g[:n].detach().double().cpu() for g in grads], 1)

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        self.logits = self.rec = self.leaves = None  # type: ignore[assignment]


def _graph(lm: Any, batch: Any, tok: tuple[int, int | None], feats: list[tuple[int, int, int]], acts: list[Tensor],
           A_t: Tensor, slot_of: list[int], values: Tensor, node_threshold: float, edge_threshold: float,
           max_nodes: int, sizes: tuple[int, int, int, int]
           ) -> tuple[GraphResult, list[tuple[int, int, str, str, float]]]:  # fmt: skip
    """Prune by influence and build the graph result; also the kept edges as
    ``(target node, source, target id, source id, weight)``."""
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
    inf = torch.cat([_influence(A_t, slot_of, n_emb, n_feat), torch.zeros(1, dtype=torch.float64)])
    is_err = torch.zeros(N, dtype=torch.bool)
    is_err[n_emb + n_feat : n_emb + n_feat + n_err] = True
    tok_inf, err_inf = inf[:n_emb].sum(), inf[is_err].sum()
    replacement = float(tok_inf / (tok_inf + err_inf).clamp_min(1e-30))
    # every row's error share; one absolute copy of the rows at a time (memory)
    W = A_t.abs()
    row_sum = W.sum(1)  # [rows]
    row_err = W[:, n_emb + n_feat : n_emb + n_feat + n_err].sum(1) / row_sum.clamp_min(1e-30)
    weight_t = torch.where(row_node == logit, torch.ones(len(row_node), dtype=torch.float64),
                           inf[row_node])  # fmt: skip
    # circuit-tracer's completeness: every node's non-error input share weighted by its
    # influence (+1 for the target); nodes without inputs (tokens, errors, biases) count 1;
    # features whose inputs were not computed (row budget) are left out
    w_rows = weight_t * (row_sum > 0)
    no_inputs = float(inf[:n_emb].sum() + inf[n_emb + n_feat : n_src].sum())
    completeness = float((((1 - row_err) * w_rows).sum() + no_inputs)
                         / (w_rows.sum() + no_inputs).clamp_min(1e-30))  # fmt: skip
    # node pruning by influence until node_threshold of the total (and max_nodes)
    order = torch.argsort(inf, descending=True)
    total = float(inf.sum())
    keep = torch.zeros(N, dtype=torch.bool)
    keep[logit] = True
    acc, n_kept = 0.0, 1
    for idx in order.tolist():
        if acc >= node_threshold * total or n_kept >= max_nodes or inf[idx] <= 0:
            break
        keep[idx] = True
        acc += float(inf[idx])
        n_kept += 1
    # edge pruning among kept nodes (a small block): |effect| x the target's influence
    krows = keep[row_node].nonzero()[:, 0]  # slots of kept targets
    kcols = keep[:n_src].nonzero()[:, 0]
    score = W[krows][:, kcols] * weight_t[krows, None].clamp_min(0)
    del W
    flat = score.flatten()
    idx = torch.argsort(flat, descending=True)
    csum = torch.cumsum(flat[idx], 0)
    n_keep = int((csum < edge_threshold * float(flat.sum())).sum()) + 1
    if edge_threshold >= 1.0:  # every edge (round-off in the sum must not drop the tail)
        n_keep = len(flat)
    picked = idx[: min(n_keep, int((flat > 0).sum()))]
    slots = krows[picked // len(kcols)]  # [edges] rows of A (targets)
    srcs = kcols[picked % len(kcols)]  # [edges] sources
    weights = A_t[slots, srcs].tolist()
    tgts = row_node[slots].tolist()
    srcs_l = srcs.tolist()

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

    used = sorted(set(tgts) | set(srcs_l) | {logit})
    table = {k: node(k) for k in used}
    rows = list(table.values())
    nodes: dict[str, list[Any]] = {c: [r[c] for r in rows] for c in rows[0]}
    nodes["influence"] = [float(inf[k]) if k != logit else 1.0 for k in used]
    nodes["level"] = [r["layer"] + (1 if r["kind"] != "embedding" else 0) for r in rows]
    nodes["token"] = [toks[r["position"]] if r["position"] >= 0 else "" for r in rows]
    edges: dict[str, list[Any]] = {
        "source": [table[k]["id"] for k in srcs_l],
        "target": [table[k]["id"] for k in tgts],
        "weight": weights,
        "kind": [table[k]["kind"] for k in srcs_l],
    }
    # what the sources do not explain: the model's own constant terms (attention and norm
    # biases, learned position embeddings); 0 up to float error for a model without them
    other = values[[len(values) - 1 if f < 0 else f for f in slot_of]] - A_t.sum(1)
    return GraphResult(
        nodes,
        edges,
        method="attribution_graph",
        target=_target_label(lm, tok),
        params={
            "node_threshold": node_threshold,
            "edge_threshold": edge_threshold,
            "max_nodes": max_nodes,
        },
        model_id=str(lm.name),
        meta={
            "tokens": toks,
            "n_sources": n_src,
            "ids": batch.input_ids[0].tolist(),
            "target_id": tok[0],
            "target_wrong_id": tok[1],
        },  # fmt: skip
        diagnostics={
            "replacement_score": replacement,
            "completeness_score": completeness,
            "n_features": n_feat,
            "n_nodes_unpruned": N,
            "constant_terms_max": float(other.abs().max()),
        },
    ), list(zip(tgts, srcs_l, edges["target"], edges["source"], weights))
