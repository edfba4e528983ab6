"""Benchmark (#18): attribution-graph parity with ``circuit-tracer`` 0.5.0.

One tiny random-weight Llama-architecture model (bias-free; random RMSNorm
weights; 2 layers, d_model 32 by default) and one random ReLU transcoder per
layer (width 4 x d_model, random encoder/decoder, negative encoder bias for
sparsity, nonzero decoder bias), written once to a temp dir: the model with
``save_pretrained``, the transcoders in circuit-tracer's layout (``config.yaml``
+ ``layer_{l}.safetensors``; ``W_enc``/``W_dec`` stored ``[width, d_model]``).

* circuit-tracer side (its own venv ``benchmarks/_envs/circuittracer``, where
  this script re-runs itself with ``--peer``): the model loaded from the local
  files into a ``HookedTransformer`` (TransformerLens backend, no weight
  processing) turned into circuit-tracer's ``TransformerLensReplacementModel``
  exactly as ``from_pretrained_and_transcoders`` does; the transcoders through
  circuit-tracer's own ``load_transcoders`` on the local ``config.yaml``;
  ``circuit_tracer.attribute(ids, model, attribution_targets=tensor([tok]))``.
  It stays alive and runs on request (``benchmarks/_peer.py``), so timings
  interleave with attrlab's (A B C D, D C B A, ...; ``benchmarks/_interleave.py``).
* attrlab side: the same files through ``al.dictionaries.load`` and
  ``al.attribution_graph(lm, ids, tcs, target=tok, node_threshold=1.0,
  edge_threshold=1.0, max_nodes=10**9)``; the unpruned adjacency rows are also
  captured (by wrapping the module's ``_graph``) to compare every row.

Conventions made to match (where the libraries legitimately differ):

* transcoder input: ``feature_input_hook: hook_resid_mid`` (the residual before
  the MLP's norm), which is what attrlab's ``blocks.{l}.mlp.in`` is; attrlab's
  loader maps ``hook_resid_mid`` to ``resid_mid``, so the loaded dictionaries get
  ``in_site = blocks.{l}.mlp.in`` (the same tensor in a sequential-residual block).
* the logit: circuit-tracer attributes the *demeaned* logit (unembedding column
  minus the mean column); the model's unembedding is centred over the vocabulary
  so both targets are the same number.
* position 0: circuit-tracer zeroes every feature and the error vector at
  position 0 (a BOS); attrlab keeps them. Compared: nodes at positions >= 1; the
  pos-0 error columns and attrlab's extra pos-0 feature columns are reported
  separately, as are attrlab's transcoder-bias columns (circuit-tracer keeps
  ``b_dec`` out of the error and drops it as a constant).

Timed rows (ratio = circuit-tracer / attrlab): the library defaults (attrlab's
``al.attribution_graph(lm, ids, tcs, target=tok)`` with no tuning arguments vs
``circuit_tracer.attribute`` with its default batch size plus ``prune_graph``
at its documented 0.8 / 0.98 thresholds) and the parity run (every edge kept,
32 rows per backward on both sides; circuit-tracer's ``attribute`` alone).

Build the peer environment once::

    python -m venv benchmarks/_envs/circuittracer
    benchmarks/_envs/circuittracer/bin/pip install torch==2.13.0
    benchmarks/_envs/circuittracer/bin/pip install "transformers==4.57.3" \\
        "transformer-lens==2.18.0" "huggingface-hub<1" einops pyyaml safetensors numpy \\
        "datasets<3" "pyarrow<16"
    benchmarks/_envs/circuittracer/bin/pip install --no-deps circuit-tracer==0.5.0

(circuit-tracer pins ``transformers<=4.57.3`` and requires ``nnsight``, which
only its nnsight backend imports; ``--no-deps`` leaves nnsight out.)

Run::

    python benchmarks/bench_graph_parity.py
    python benchmarks/bench_graph_parity.py --layers 4 --d-model 64 --seq 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_graph_parity"
PEER_PY = ROOT / "_envs" / "circuittracer" / "bin" / "python"
INSTALL = (
    "python -m venv benchmarks/_envs/circuittracer && benchmarks/_envs/circuittracer/bin/pip "
    'install torch==2.13.0 && benchmarks/_envs/circuittracer/bin/pip install "transformers==4.57.3" '
    '"transformer-lens==2.18.0" "huggingface-hub<1" einops pyyaml safetensors numpy "datasets<3" "pyarrow<16" && '
    "benchmarks/_envs/circuittracer/bin/pip install --no-deps circuit-tracer==0.5.0"
)


# ---------------------------------------------------------------- peer side
def peer(tmp: str) -> None:
    """circuit-tracer side: load the local model and transcoders, then answer
    ``run {"batch_size", "prune"}`` lines on stdin with one ``attribute`` (and
    ``prune_graph``) each; ``save`` runs the parity graph and writes it."""
    import circuit_tracer
    import yaml
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.utils.hf_utils import load_transcoders
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

    d = Path(tmp)
    meta = json.loads((d / "meta.json").read_text())
    torch.set_num_threads(int(meta["threads"]))
    hf = LlamaForCausalLM.from_pretrained(str(d / "model"), dtype=torch.float32).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads, n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps, d_vocab=c.vocab_size,
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=meta["rope_theta"], final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", default_prepend_bos=False,
        model_name="tiny-llama", dtype=torch.float32, device="cpu",
    )  # fmt: skip
    # the tokenizer saved by transformers 5 names a class 4.57 lacks: read its tokenizer.json
    special = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "model" / "tokenizer.json"),
                                  bos_token=special, eos_token=special, pad_token=special,
                                  unk_token=special)  # fmt: skip
    tok.save_pretrained(str(d / "tokenizer_tf4"))  # TransformerLens reloads it by its path
    tok = AutoTokenizer.from_pretrained(str(d / "tokenizer_tf4"))
    # what TransformerLensReplacementModel.from_pretrained_and_transcoders does, from local weights
    model = TransformerLensReplacementModel(cfg, tokenizer=tok)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)  # fmt: skip
    config = yaml.safe_load((d / "transcoders" / "config.yaml").read_text())
    transcoders = load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32,
                                   lazy_encoder=False, lazy_decoder=False)  # fmt: skip
    model._configure_replacement_model(transcoders)
    ids = torch.tensor(meta["ids"])
    with torch.no_grad():
        tl_logits = model(ids[None])[0]
        hf_logits = hf(ids[None]).logits[0]
    check = {"tl_vs_hf_logits_max_abs": float((tl_logits - hf_logits).abs().max()),
             "circuit_tracer": circuit_tracer.__version__}  # fmt: skip
    from _peer import serve

    def attribute(msg: dict[str, Any]) -> Any:
        kw = {} if msg.get("batch_size") is None else {"batch_size": int(msg["batch_size"])}
        return circuit_tracer.attribute(ids, model, attribution_targets=torch.tensor([meta["target"]]),
                                        **kw)  # fmt: skip

    def run(msg: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        g = attribute(msg)
        t1 = time.perf_counter()
        if msg.get("prune", True):
            prune_graph(g, node_threshold=0.8, edge_threshold=0.98)
        return {"attribute": t1 - t0, "prune": time.perf_counter() - t1}

    def save(msg: dict[str, Any]) -> dict[str, Any]:
        g = attribute(msg)
        save_file({
            "adjacency": g.adjacency_matrix.float().contiguous(),
            "active_features": g.active_features.long().contiguous(),
            "activation_values": g.activation_values.float().contiguous(),
            "selected_features": g.selected_features.long().contiguous(),
        }, str(d / "peer.safetensors"))  # fmt: skip
        out: dict[str, Any] = {}
        out["replacement_score"], out["completeness_score"] = compute_graph_scores(g)
        out["completeness_rows_with_inputs"] = completeness_rows_with_inputs(g)
        return out

    serve({"run": run, "save": save}, ready=check)


def completeness_rows_with_inputs(g: Any) -> float:
    """circuit-tracer's completeness with only the nodes that have inputs (features whose
    row was computed, the logit) weighted: ``compute_graph_scores`` also counts every token
    and error node (no inputs, so an error share of 0) with its influence as weight."""
    from circuit_tracer.graph import compute_influence, normalize_matrix

    A = g.adjacency_matrix
    n_err = len(g.input_tokens) * g.cfg.n_layers
    nf = len(g.selected_features)
    lw = torch.zeros(A.shape[0])
    lw[-len(g.logit_targets) :] = g.logit_probabilities
    An = normalize_matrix(A)
    w = (compute_influence(An, lw) + lw) * (A.abs().sum(1) > 0)
    return float(((1 - An[:, nf : nf + n_err].sum(-1)) * w).sum() / w.sum())


# ---------------------------------------------------------------- setup
def build(tmp: Path, layers: int, d_model: int, seq: int, seed: int,
          input_hook: str = "hook_resid_mid") -> dict[str, Any]:  # fmt: skip
    """Write the model, tokenizer and transcoders (circuit-tracer layout) to ``tmp``."""
    import yaml
    from safetensors.torch import save_file

    import attrlab as al

    heads = 4 if d_model < 64 else 8
    model, tok = al.testing.tiny_model("llama", seed=seed, num_hidden_layers=layers,
                                       hidden_size=d_model, intermediate_size=2 * d_model,
                                       num_attention_heads=heads, num_key_value_heads=heads // 2)  # fmt: skip
    with torch.no_grad():
        # centred unembedding: the logit equals circuit-tracer's demeaned logit
        W = model.lm_head.weight
        W -= W.mean(0, keepdim=True)
        # the BOS (= pad id 0, whose embedding HF initialises to zero) gets a real embedding, so
        # that features fire at position 0 and the two position-0 conventions show
        E = model.model.embed_tokens.weight
        E[0] = E[1:].std() * torch.randn(E.shape[1], generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(str(tmp / "model"))
    tok.save_pretrained(str(tmp / "model"))
    # a prompt starting with the special token (circuit-tracer would prepend one otherwise)
    gi = torch.Generator().manual_seed(seed + 2)
    ids = [int(tok.bos_token_id)] + torch.randint(1, len(tok), (seq - 1,), generator=gi).tolist()
    # transcoder scales from the model's own activations on the prompt: pre-activations
    # about N(0, 1), encoder biases in [-1.5, -1] (a tenth or so of the features active)
    lm = al.wrap(model, tok)
    sites = [f"blocks.{la}.mlp.{s}" for la in range(layers) for s in ("in", "out")]
    with torch.no_grad():
        _, cache = lm.run(lm.tokenize([ids]), cache=sites)
    g = torch.Generator().manual_seed(seed + 1)
    width = 4 * d_model
    tc_dir = tmp / "transcoders"
    tc_dir.mkdir()
    paths = []
    for layer in range(layers):
        x_norm = float(cache[f"blocks.{layer}.mlp.in"][0].norm(dim=-1).mean())
        y_norm = float(cache[f"blocks.{layer}.mlp.out"][0].norm(dim=-1).mean())
        W_dec = torch.randn(width, d_model, generator=g)
        t = {
            "W_enc": (torch.randn(width, d_model, generator=g) / x_norm).contiguous(),
            "b_enc": -1.0 - 0.5 * torch.rand(width, generator=g),
            "W_dec": (0.25 * y_norm * W_dec / W_dec.norm(dim=-1, keepdim=True)).contiguous(),
            "b_dec": 0.1 * y_norm / d_model**0.5 * torch.randn(d_model, generator=g),
        }
        paths.append(str(tc_dir / f"layer_{layer}.safetensors"))
        save_file(t, paths[-1])
    cfg = {"model_kind": "transcoder_set", "scan": "attrlab-bench-random",
           "feature_input_hook": input_hook, "feature_output_hook": "hook_mlp_out",
           "transcoders": paths}  # fmt: skip
    (tc_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    rope = getattr(model.config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(model.config, "rope_theta", 10000.0)))
    return {"lm": lm, "ids": ids, "rope_theta": theta}


def attrlab_transcoders(tmp: Path) -> list[Any]:
    """The circuit-tracer files through attrlab's loader, read at ``mlp.in``."""
    import dataclasses

    import attrlab as al

    loaded = al.dictionaries.load(tmp / "transcoders")
    tcs = []
    for layer, dct in enumerate(loaded):
        # hook_resid_mid -> blocks.l.resid_mid (the same tensor as mlp.in here); the loader
        # maps circuit-tracer's mlp.hook_in (after the norm there) to mlp.in (before it)
        assert dct.in_site in (f"blocks.{layer}.resid_mid", f"blocks.{layer}.mlp.in"), dct.in_site
        tcs.append(dataclasses.replace(dct, in_site=f"blocks.{layer}.mlp.in"))
    return tcs


class Capture:
    """Wraps the graph module's ``_graph`` to keep the unpruned rows it receives."""

    def __init__(self) -> None:
        import inspect

        self.mod = sys.modules["attrlab.methods.attribution_graph"]
        self.orig = self.mod._graph
        self.sig = inspect.signature(self.orig)
        self.got: dict[str, Any] = {}

    def __enter__(self) -> Capture:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            b = self.sig.bind(*args, **kwargs)
            self.got = {k: b.arguments.get(k) for k in ("feats", "A_t", "slot_of")}
            return self.orig(*args, **kwargs)

        self.mod._graph = wrapped
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mod._graph = self.orig


# ---------------------------------------------------------------- comparison
def _key_of(node_id: str) -> tuple:
    """attrlab node id -> the shared node key (``("f", (layer, pos, feature))`` etc.)."""
    if node_id == "logit":
        return ("logit",)
    if node_id.startswith("emb."):
        return ("emb", int(node_id[4:]))
    if node_id.startswith("err"):
        la, p = node_id[3:].split("@")
        return ("err", int(la), int(p))
    if node_id.startswith("f"):
        li, p = node_id[1:].split("@")
        la, i = li.split(".")
        return ("f", (int(la), int(p), int(i)))
    return ("other", node_id)


def compare(tmp: Path, g: Any, cap: dict[str, Any], P: int, L: int) -> dict[str, Any]:
    """circuit-tracer's dense adjacency against attrlab's unpruned rows and public edges."""
    from safetensors.torch import load_file

    ct = load_file(str(tmp / "peer.safetensors"))
    A_ct = ct["adjacency"].double().numpy()  # [N, N], rows = targets, cols = sources
    ct_feats = [tuple(int(v) for v in r) for r in ct["active_features"].tolist()]
    nf, N = len(ct_feats), A_ct.shape[0]
    assert N - nf - (L + 1) * P == 1, "one logit target"
    # circuit-tracer's order: features (layer, pos, feature), errors (layer-major), tokens, logits
    ct_col: dict[tuple, int] = {("f", f): k for k, f in enumerate(ct_feats)}
    ct_col.update({("err", la, p): nf + la * P + p for la in range(L) for p in range(P)})
    ct_col.update({("emb", p): nf + L * P + p for p in range(P)})
    ct_col[("logit",)] = N - 1
    # attrlab's order: embeddings, features, errors (layer-major), transcoder biases
    al_feats = [tuple(int(v) for v in f) for f in cap["feats"]]
    A_al = cap["A_t"].double().numpy()
    al_src = [("emb", p) for p in range(P)] + [("f", f) for f in al_feats]
    al_src += [("err", la, p) for la in range(L) for p in range(P)]
    al_src += [("tcbias", la) for la in range(L)]
    assert len(al_src) == A_al.shape[1], (len(al_src), A_al.shape)
    al_rows = [("logit",) if s < 0 else ("f", al_feats[s]) for s in cap["slot_of"]]
    res: dict[str, Any] = {
        "active_features_circuit_tracer": nf,
        "active_features_attrlab": len(al_feats),
        "attrlab_features_at_pos0": sum(1 for f in al_feats if f[1] == 0),
        "feature_sets_differ_at_pos_ge1": len(
            {f for f in set(al_feats) ^ set(ct_feats) if f[1] >= 1}
        ),  # fmt: skip
    }
    al_act = dict(zip(g.nodes["id"], g.nodes["activation"]))
    ct_act = dict(zip(ct_feats, ct["activation_values"].double().tolist()))
    diffs = [abs(al_act[f"f{la}.{i}@{p}"] - v) for (la, p, i), v in ct_act.items()
             if f"f{la}.{i}@{p}" in al_act]  # fmt: skip
    top = max((abs(v) for v in ct_act.values()), default=1.0)
    res["activation_max_diff_rel_to_max"] = max(diffs) / top if diffs else None

    # the matched block: rows = shared targets, cols = shared sources (pos-0 errors apart)
    shared = [k for k in al_src if k in ct_col and not (k[0] == "err" and k[2] == 0)]
    ra = np.array([r for r, row in enumerate(al_rows) if row in ct_col])
    rc = np.array([ct_col[al_rows[r]] for r in ra])
    al_j = {k: j for j, k in enumerate(al_src)}
    sa, sc = np.array([al_j[k] for k in shared]), np.array([ct_col[k] for k in shared])
    Aa, Ac = A_al[ra][:, sa], A_ct[rc][:, sc]
    scale = np.maximum(np.abs(Ac).max(1), 1e-30)[:, None]  # each row's largest |entry|
    rel = np.abs(Aa - Ac) / scale
    res["rows_compared"], res["rows_attrlab_only"] = len(ra), len(al_rows) - len(ra)
    res["entries_compared"] = int(rel.size)
    res["ct_nonzero_entries_compared"] = int(np.count_nonzero(Ac))
    kind = np.array([k[0] for k in shared])
    res["max_rel_err"] = {name: float(rel[:, kind == k].max()) if (kind == k).any() else None
                          for name, k in (("feature", "f"), ("error", "err"), ("token", "emb"))}  # fmt: skip
    res["max_rel_err_all"] = float(rel.max())
    res["max_abs_err_all"] = float(np.abs(Aa - Ac).max())
    # circuit-tracer's position-0 error columns are zero by construction
    err0_ct = [ct_col[("err", la, 0)] for la in range(L)]
    res["ct_pos0_error_columns_all_zero"] = bool((A_ct[:, err0_ct] == 0).all())

    # what circuit-tracer leaves out, relative to the row scale: pos-0 errors and features,
    # transcoder biases (attrlab's columns)
    def extra(pred: Any) -> float:
        cols = [j for j, k in enumerate(al_src) if pred(k)]
        return float((np.abs(A_al[ra][:, cols]) / scale).max()) if cols else 0.0

    res["attrlab_only_columns_max_rel"] = {
        "error_pos0": extra(lambda k: k[0] == "err" and k[2] == 0),
        "feature_pos0": extra(lambda k: k[0] == "f" and k[1][1] == 0),
        "transcoder_bias": extra(lambda k: k[0] == "tcbias"),
    }

    # the public (pruned) edges of the GraphResult on the same block
    pos_r = {int(c): i for i, c in enumerate(rc)}
    pos_c = {int(c): j for j, c in enumerate(sc)}
    E = np.full(Ac.shape, np.nan)
    for s, t, w in zip(g.edges["source"], g.edges["target"], g.edges["weight"]):
        ks, kt = _key_of(s), _key_of(t)
        if ks in ct_col and kt in ct_col and ct_col[ks] in pos_c and ct_col[kt] in pos_r:
            E[pos_r[ct_col[kt]], pos_c[ct_col[ks]]] = w
    present = ~np.isnan(E)
    res["public_edges_compared"] = int(present.sum())
    res["public_edges_max_rel_err"] = float((np.abs(E - Ac) / scale)[present].max())
    kept = {_key_of(n) for n in g.nodes["id"]}
    row_kept = np.array([al_rows[r] in kept for r in ra])
    col_kept = np.array([k in kept for k in shared])
    missing = (Ac != 0) & ~present
    res["ct_nonzero_not_in_public_edges"] = int(missing.sum())
    res["nodes_without_influence_dropped"] = int((~row_kept).sum())
    # pruning at thresholds 1.0 drops only nodes without influence on the logit (e.g. last-layer
    # features at earlier positions); edges between two kept nodes should all be there
    mk = missing & row_kept[:, None] & col_kept[None, :]
    res["missing_edges_between_kept_nodes"] = int(mk.sum())
    res["missing_edges_between_kept_nodes_max_rel"] = (
        float((np.abs(Ac) / scale)[mk].max()) if mk.any() else 0.0
    )
    return res


def measure(a: argparse.Namespace) -> dict[str, Any]:
    """Parity and interleaved timing for the setup in ``a`` (the command-line options)."""
    from _interleave import interleaved, loadavg, print_rows, row
    from _peer import PeerProcess

    import attrlab as al

    if not PEER_PY.exists():
        sys.exit(f"no circuit-tracer venv at {PEER_PY}; see this file's docstring")
    torch.set_num_threads(a.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        b = build(tmp, a.layers, a.d_model, a.seq, a.seed, a.input_hook)
        lm, tcs = b["lm"], attrlab_transcoders(tmp)
        batch = lm.tokenize([b["ids"]])
        with torch.no_grad():
            logits, _ = lm.run(batch)
        target = int(logits[0, -1].argmax())
        bs = 32  # rows per backward, both sides
        meta = {"ids": b["ids"], "target": target, "rope_theta": b["rope_theta"],
                "threads": a.threads, "ct_batch_size": bs}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta))
        argv = [str(PEER_PY), __file__, "--peer", str(tmp)]
        full = dict(target=target, node_threshold=1.0, edge_threshold=1.0, max_nodes=10**9,
                    batch_size=bs)  # fmt: skip
        out: dict[str, Any] = {}

        def ours_full() -> None:
            out["full"] = al.attribution_graph(lm, batch, tcs, **full)

        def ours_default() -> None:  # no tuning arguments: thresholds 0.8 / 0.98, 200 nodes
            al.attribution_graph(lm, batch, tcs, target=target)

        print(f"attribution graph, {a.layers}x{a.d_model} llama, {a.seq} tokens; load {loadavg()}")
        with PeerProcess(argv, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}) as ct:
            ct_scores = ct.call("save", batch_size=bs)
            with Capture() as cap:
                ours_full()
            g = out["full"]
            sides = {
                "attrlab defaults": ours_default,
                "circuit-tracer defaults": lambda: ct.call("run"),
                "attrlab bs=32, unpruned": ours_full,
                "circuit-tracer bs=32, attribute": lambda: ct.call("run", batch_size=bs, prune=False),
            }  # fmt: skip
            times = interleaved(sides, a.repeats)
            ready = ct.ready
        res = {"layers": a.layers, "d_model": a.d_model, "width": 4 * a.d_model, "seq": a.seq,
               "target": target, **ready}  # fmt: skip
        res.update(compare(tmp, g, cap.got, a.seq, a.layers))
        res["constant_terms_max"] = g.diagnostics.get("constant_terms_max")
        res["scores"] = {
            "circuit_tracer": [ct_scores["replacement_score"], ct_scores["completeness_score"]],
            "circuit_tracer_completeness_rows_with_inputs": ct_scores[
                "completeness_rows_with_inputs"
            ],
            "attrlab": [g.diagnostics["replacement_score"], g.diagnostics["completeness_score"]],
        }
        setup = f"{a.layers}x{a.d_model} llama + transcoders, {a.seq} tokens"
        rows = [
            row("graph", setup + ", library defaults", times, ours="attrlab defaults",
                peer="circuit-tracer defaults", agreement=res["max_rel_err_all"],
                metric="max rel adjacency err (unpruned)"),
            row("graph", setup + ", unpruned bs=32", times, ours="attrlab bs=32, unpruned",
                peer="circuit-tracer bs=32, attribute", agreement=res["max_rel_err_all"],
                metric="max rel adjacency err (unpruned)"),
        ]  # fmt: skip
        res["rows"] = rows
        res["times_raw"] = times
    print(json.dumps(res, indent=1), flush=True)
    print_rows(res["rows"])
    tag = f"L{a.layers}_d{a.d_model}_p{a.seq}" + (
        "" if a.input_hook == "hook_resid_mid" else "_mlphookin"
    )
    (OUT / f"parity_{tag}.json").write_text(json.dumps(res, indent=1))
    return res


def summary(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for ``benchmarks/run_all.py`` (quick: 3 repeats of the default 2x32 setup)."""
    from _peer import rows_or_error

    a = argparse.Namespace(layers=2, d_model=32, seq=12, repeats=3 if quick else 5, threads=1,
                           seed=0, input_hook="hook_resid_mid")  # fmt: skip
    return rows_or_error("graph", PEER_PY, INSTALL, lambda: measure(a)["rows"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--seq", type=int, default=12, help="prompt length incl. the leading BOS")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input-hook", default="hook_resid_mid", choices=["hook_resid_mid", "mlp.hook_in"],
                    help="circuit-tracer's feature_input_hook; mlp.hook_in shows the loader's mapping")  # fmt: skip
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer:
        sys.path.insert(0, str(ROOT))
        peer(a.peer)
        return
    measure(a)


if __name__ == "__main__":
    main()
