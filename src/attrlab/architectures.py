"""The method x architecture matrix: which method runs on which model family.

One *cell* runs one attribution method on a tiny random-weight model of one
family (:func:`attrlab.testing.tiny_model`) with short inputs and checks the
result: finite scores of the right shape and, where the method has one, its
exactness invariant (DLA's parts sum to the target logit minus the unembedding
bias, IG / EAP-IG / AttnLRP completeness, EAP equals autograd through the
gates, exact Shapley efficiency, patching one unit equals the same patch made
by hand with ``lm.run(interventions=...)``, the logit lens' last layer equals
the model's own log-probability). A cell ends in one of three ways:

* ``pass``: the checks hold;
* ``refuse``: attrlab raised one of its typed errors
  (:class:`attrlab.errors.AttrlabError`): the family cannot support the method,
  and the message says why;
* ``fail``: anything else (an ``AttributeError`` or a shape error from torch,
  NaN scores, a broken invariant) — a bug.

``tests/test_architectures.py`` runs every cell (and fails on a ``fail``);
``benchmarks/architecture_table.py`` runs the same cells and writes
``docs/architectures.md``. Every registered method of
:func:`attrlab.methods.base.all_methods` has a cell (one representative unit
kind each), plus the functions that return lenses and graphs.

Example:
    >>> from attrlab.architectures import run_cell
    >>> run_cell("gpt2", "dla").status
    'pass'
"""

from __future__ import annotations

import functools
import math
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import AttrlabError

PROMPT = "Mary and John went, John gave to"
CF = "Mary and John went, Mary gave to"
TARGET = (" Mary", " John")
CONTEXT = "Paris is a city in France. Rome is a city in Italy. The cat sat on the mat."
QUERY = "The capital of France is"
TRAIN_TEXTS = ("Paris is a city in France.", "Rome is a city in Italy.", "A cat sat on the mat.")


class InvariantError(AssertionError):
    """A cell's result breaks the method's own exactness invariant (or is not
    finite, or has the wrong shape): a bug, never a refusal."""


@dataclass
class Outcome:
    """How one cell ended: ``status`` is ``pass``, ``refuse`` or ``fail``;
    ``reason``: the typed error (refusals) or the exception (failures)."""

    family: str
    method: str
    status: str
    reason: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Cell:
    """One method's column: the unit kind it runs on and the function that runs
    it on a wrapped model and checks the result (raising :class:`InvariantError`)."""

    method: str
    units: str
    run: Callable[[Any], None] = field(repr=False)
    #: not an ``al.attribute`` method: a function returning a lens or a graph
    function: bool = False


# ------------------------------------------------------------------ models
@functools.cache
def model(family: str) -> Any:
    """The wrapped tiny model of ``family`` (built once per process).

    Larger initial weights than Hugging Face's 0.02, so that effects and
    invariants are far above rounding."""
    from . import testing
    from .model import wrap

    return wrap(*testing.tiny_model(family, initializer_range=0.3))


_STORES: dict[Any, Any] = {}


def _store(lm: Any) -> Any:
    """A feature store of :data:`TRAIN_TEXTS` for the training-data methods
    (one per model, in a temporary directory)."""
    from . import data as ad

    if id(lm) not in _STORES:
        tmp = tempfile.TemporaryDirectory(prefix="attrlab-architectures-")  # removed at exit
        ex = ad.Examples.from_texts(lm, list(TRAIN_TEXTS), ids=[f"d{i}" for i in range(3)])
        _STORES[id(lm)] = (lm, tmp, ad.featurize(lm, ex, tmp.name, proj_dim=16, progress=False))
    return _STORES[id(lm)][2]


def _factor_store(lm: Any) -> Any:
    """EK-FAC factors of :data:`TRAIN_TEXTS` (one per model, in a temporary directory)."""
    from . import data as ad

    key = ("factors", id(lm))
    if key not in _STORES:
        tmp = tempfile.TemporaryDirectory(prefix="attrlab-architectures-")  # removed at exit
        ex = ad.Examples.from_texts(lm, list(TRAIN_TEXTS), ids=[f"d{i}" for i in range(3)])
        _STORES[key] = (lm, tmp, ad.fit_factors(lm, ex, tmp.name, batch_size=3))
    return _STORES[key][2]


def _influence_method(method: str) -> Callable[[Any], None]:
    def run(lm: Any) -> None:
        from .units.examples import TrainingExamples

        u = TrainingExamples(_factor_store(lm), texts=list(TRAIN_TEXTS))
        _finite(_attr(lm, QUERY, " Paris", units=u, method=method), len(TRAIN_TEXTS))

    return run


def _transcoders(lm: Any, k: int = 4) -> list[Any]:
    from .dictionaries import Dictionary

    return [
        Dictionary.random(lm.cfg.d_model, 16, f"blocks.{layer}.mlp.in",
                          f"blocks.{layer}.mlp.out", activation="topk", k=k, seed=layer)
        for layer in range(lm.cfg.n_layers)
    ]  # fmt: skip


# ------------------------------------------------------------------ checks
def _finite(r: Any, n_units: int | None = None, rows: int | None = None) -> Any:
    """The scores, checked: finite, one per unit label (``n_units`` if given)."""
    s = torch.as_tensor(r.scores)
    if not bool(torch.isfinite(s).all()):
        raise InvariantError(f"{int((~torch.isfinite(s)).sum())} non-finite scores")
    labels = next(iter(r.units.values()), None) if getattr(r, "units", None) else None
    if labels is not None and s.shape[-1] != len(labels):
        raise InvariantError(f"scores {tuple(s.shape)} for {len(labels)} unit labels")
    if n_units is not None and s.shape[-1] != n_units:
        raise InvariantError(f"scores {tuple(s.shape)}, want {n_units} units")
    if rows is not None and (s.shape[0] if s.dim() > 1 else 1) != rows:
        raise InvariantError(f"scores {tuple(s.shape)}, want {rows} rows")
    if s.numel() == 0:
        raise InvariantError("no scores")
    return s


def _close(what: str, got: float, want: float, rel: float, abs_: float = 1e-5) -> None:
    if not (math.isfinite(got) and abs(got - want) <= rel * abs(want) + abs_):
        raise InvariantError(f"{what}: got {got:.6g}, want {want:.6g} (rel {rel:g})")


def _n_tokens(lm: Any, text: str) -> int:
    return int(lm.tokenize(text).input_ids.shape[1])


def _logit_diff(lm: Any, interventions: Sequence[Any] = ()) -> float:
    logits, _ = lm.run(PROMPT, interventions=list(interventions))
    a, b = lm.token_id(TARGET[0]), lm.token_id(TARGET[1])
    return float(logits[0, -1, a].double() - logits[0, -1, b].double())


def _attr(lm: Any, *args: Any, **kw: Any) -> Any:
    from .attribute import attribute

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attribute(lm, *args, **kw)


def _heads(lm: Any) -> int:
    return lm.cfg.n_layers * lm.cfg.n_heads


# ------------------------------------------------------------------- cells
def _trace(method: str, **opts: Any) -> Callable[[Any], None]:
    """A Thought Anchors method on a given 3-sentence trace (rollouts, if any,
    stop after a few tokens)."""

    def run(lm: Any) -> None:
        from .units.trace import Trace

        units = Trace(trace=" The cat sat. It was warm. Then it slept.", max_new_tokens=16)
        r = _attr(lm, "Paris is a city.", units=units, method=method, **opts)
        _finite(r, 3)

    return run


def _component(method: str, units: str, **opts: Any) -> Callable[[Any], None]:
    def run(lm: Any) -> None:
        n = {"heads": _heads(lm), "mlp": lm.cfg.n_layers, "attn": lm.cfg.n_layers}.get(units)
        u = _units(units)
        _finite(_attr(lm, PROMPT, TARGET, units=u, method=method, counterfactual=CF, **opts), n)

    return run


def _units(spec: str) -> Any:
    """The unit object a cell uses for ``spec``."""
    from . import units as U

    if spec == "neurons":
        return U.Neurons(neurons=[0, 1, 2, 3])
    if spec == "heads-per-position":
        return U.Heads(per_position=True)
    return U.resolve(spec)


def _dla(lm: Any) -> None:
    r = _attr(lm, PROMPT, TARGET, units="heads", method="dla", complete=True)
    s = _finite(r)
    _, cache = lm.run(PROMPT, cache=["unembed"])  # before any soft-capping
    last = cache["unembed"][0, -1].double()
    a, b = lm.token_id(TARGET[0]), lm.token_id(TARGET[1])
    want = float(last[a] - last[b])
    bias = lm.b_U()
    if bias is not None:
        want -= float(bias[a].detach().double() - bias[b].detach().double())
    _close("DLA parts sum to the logit difference minus the unembedding bias",
           float(s.double().sum()), want, rel=1e-4)  # fmt: skip


def _patch(lm: Any) -> None:
    from .model.interventions import Intervention

    r = _attr(lm, PROMPT, TARGET, units="heads", method="patch", counterfactual=CF)
    s = _finite(r, _heads(lm))
    j = int(s.abs().argmax())
    layer, head = int(r.units["layer"][j]), int(r.units["head"][j])
    site = f"blocks.{layer}.attn.z"
    _, cf = lm.run(CF, cache=[site])
    hand = Intervention(site, cf[site][:, :, [head]], heads=[head])
    want = _logit_diff(lm) - _logit_diff(lm, [hand])
    _close(f"patching head {layer}.{head} equals the hand patch", float(s[j]), want, rel=1e-4)


def _ig(lm: Any) -> None:
    # baseline: a token whose embedding is not zero (the pad token's is in these
    # random models, and a zero input to an RMS norm makes the path singular at 0)
    r = _attr(lm, PROMPT, TARGET, units="tokens", method="ig", steps=128, ablation=7)
    _finite(r, _n_tokens(lm, PROMPT))
    _complete(lm, r, "IG completeness", rel=0.01)


def _complete(lm: Any, r: Any, what: str, rel: float = 0.05) -> None:
    """The reported completeness error is the true one (``sum(scores) - delta``)
    and small, except on mixtures of experts: top-k routing makes the target
    jump along the path where the chosen experts change, so no quadrature
    converges (the method still reports its error honestly)."""
    d = r.diagnostics
    err, delta = _scalar(d["completeness_error"]), _scalar(d["delta"])
    total = float(torch.as_tensor(r.scores).double().sum())
    _close(f"{what}: the reported error", err, total - delta, rel=1e-4, abs_=1e-4)
    if routed(lm):
        return
    if not abs(err) <= rel * abs(delta) + 1e-3:
        raise InvariantError(f"{what}: error {err:.4g} for a change of {delta:.4g}")


def routed(lm: Any) -> bool:
    """Whether the model's MLPs route tokens to top-k experts (not continuous)."""
    return (getattr(lm.cfg, "n_experts", None) or 0) > 1


def _scalar(v: Any) -> float:
    while isinstance(v, (list, tuple)):
        v = v[0]
    return float(v)


def _eap_ig(lm: Any) -> None:
    from .units.edges import Edges

    r = _attr(lm, PROMPT, TARGET, units="edges", method="eap-ig", counterfactual=CF, steps=64)
    _finite(r, Edges().graph(lm).n_edges)
    _complete(lm, r, "EAP-IG completeness")


def _edges(method: str, **opts: Any) -> Callable[[Any], None]:
    def run(lm: Any) -> None:
        from .units.edges import Edges

        r = _attr(lm, PROMPT, TARGET, units="edges", method=method, counterfactual=CF, **opts)
        _finite(r, Edges().graph(lm).n_edges)

    return run


def _eap(lm: Any) -> None:
    """EAP's closed-form gate gradient equals autograd through ``f_gated``."""
    from .ablations import Counterfactual
    from .units.base import Bound
    from .units.edges import Edges

    r = _attr(lm, PROMPT, TARGET, units="edges", method="eap", counterfactual=CF)
    s = _finite(r, Edges().graph(lm).n_edges).double()
    u = Edges()
    bound = u.bind(lm, PROMPT, u.resolve_target(TARGET, lm), Counterfactual(CF))
    _, grad = Bound.gate_grad(bound, torch.ones(1, bound.n))  # autograd, no fast path
    want = grad[0, 0].double()
    err = float((s.reshape(-1) - want).abs().max())
    if not err <= 1e-4 * float(want.abs().max()) + 1e-6:
        raise InvariantError(f"EAP differs from autograd through f_gated by {err:.4g}")


def _attnlrp(lm: Any) -> None:
    r = _attr(lm, PROMPT, TARGET, units="tokens", method="attnlrp")
    _finite(r, _n_tokens(lm, PROMPT))
    d = r.diagnostics
    err, value = _scalar(d["conservation_error"]), _scalar(d["value"])
    if not abs(err) <= 1e-3 * max(1.0, abs(value)):
        raise InvariantError(f"AttnLRP conservation: error {err:.4g} for a value of {value:.4g}")


def _shapley_exact(lm: Any) -> None:
    from .ablations import Counterfactual
    from .units import resolve

    r = _attr(lm, PROMPT, TARGET, units="layers", method="shapley-exact", counterfactual=CF)
    s = _finite(r)
    u = resolve("layers")
    bound = u.bind(lm, PROMPT, u.resolve_target(TARGET, lm), Counterfactual(CF))
    keep = torch.stack(
        [torch.ones(bound.n, dtype=torch.bool), torch.zeros(bound.n, dtype=torch.bool)]
    )
    f = bound.f(keep).double()
    _close("exact Shapley values sum to f(all) - f(none)", float(s.double().sum()),
           float(f[0, 0] - f[1, 0]), rel=1e-4)  # fmt: skip


def _inputs(method: str, units: str, text: str = PROMPT, **opts: Any) -> Callable[[Any], None]:
    def run(lm: Any) -> None:
        _finite(_attr(lm, text, TARGET, units=units, method=method, **opts))

    return run


def _sources(method: str, **opts: Any) -> Callable[[Any], None]:
    def run(lm: Any) -> None:
        r = _attr(lm, CONTEXT, " Paris", units="sources", method=method, query=QUERY, **opts)
        _finite(r, 3)

    return run


def _features(method: str, **opts: Any) -> Callable[[Any], None]:
    def run(lm: Any) -> None:
        from .dictionaries import Dictionary
        from .units.features import Features

        d = Dictionary.random(lm.cfg.d_model, 16, "blocks.1.resid_pre", seed=0)
        _finite(_attr(lm, PROMPT, TARGET, units=Features(d), method=method,
                      counterfactual=CF, **opts))  # fmt: skip

    return run


def _store_method(method: str) -> Callable[[Any], None]:
    def run(lm: Any) -> None:
        from .units.examples import TrainingExamples

        u = TrainingExamples(_store(lm), texts=list(TRAIN_TEXTS))
        _finite(_attr(lm, QUERY, " Paris", units=u, method=method), len(TRAIN_TEXTS))

    return run


def _datamodels(lm: Any) -> None:
    """Datamodels over training examples, "retrained" by putting the kept
    examples in context (one forward of the family's model per subset)."""
    import numpy as np

    from .methods.base import find_method
    from .units.examples import TrainingExamples

    target = lm.token_id(" Paris")

    def retrain(idx: np.ndarray, j: int) -> np.ndarray:
        text = " ".join(TRAIN_TEXTS[i] for i in idx) + " " + QUERY
        logits, _ = lm.run(text.strip())
        return np.array([float(torch.log_softmax(logits[0, -1].double(), -1)[target])])

    u = TrainingExamples(retrain=retrain, n_train=len(TRAIN_TEXTS))
    method: Any = find_method("datamodels", "train")
    r = method(samples=8).run(u.bind())
    _finite(r, len(TRAIN_TEXTS))


def _logit_lens(lm: Any) -> None:
    from .methods.lens import logit_lens

    r = logit_lens(lm, PROMPT, target=" Mary")
    s = _finite(r)
    logits, _ = lm.run(PROMPT)
    want = float(torch.log_softmax(logits[0, -1].double(), -1)[lm.token_id(" Mary")])
    _close("the logit lens' last layer is the model's own log-probability",
           float(s.reshape(-1)[-1]), want, rel=1e-4)  # fmt: skip


def _tuned_lens(lm: Any) -> None:
    from .lenses import train_tuned_lens
    from .methods.lens import logit_lens

    lens = train_tuned_lens(lm, list(TRAIN_TEXTS), steps=2, batch_size=3, progress=False)
    _finite(logit_lens(lm, PROMPT, target=" Mary", lens=lens))


def _routes(lm: Any) -> None:
    from .methods.routes import routes

    g = routes(lm, PROMPT, tau=0.04)
    _graph_finite(g)


def _graph(lm: Any) -> None:
    from .methods.attribution_graph import attribution_graph

    g = attribution_graph(lm, PROMPT, _transcoders(lm), target=" Mary", max_nodes=40)
    _graph_finite(g)


def _graph_finite(g: Any) -> None:
    edges = g.to_pandas("edges")
    if len(edges) == 0:
        raise InvariantError("the graph has no edges")
    w = torch.tensor(edges["weight"].to_numpy(dtype="float64"))
    if not bool(torch.isfinite(w).all()):
        raise InvariantError("non-finite edge weights")


CELLS: tuple[Cell, ...] = (
    Cell("acdc", "edges", _edges("acdc", tau=0.03)),
    Cell("atp", "heads", _component("atp", "heads")),
    Cell("atp*", "Heads(per_position=True)", _component("atp*", "heads-per-position")),
    Cell("attention", "sources", _sources("attention")),
    Cell("attnlrp", "tokens", _attnlrp),
    Cell("attntrace", "sources", _sources("attntrace", subsamples=4)),
    Cell("coar", "heads", _component("coar", "heads", samples=16)),
    Cell("contextcite", "sources", _sources("contextcite", samples=8)),
    Cell("datamodels", "TrainingExamples(retrain=...)", _datamodels),
    Cell("dla", "heads", _dla),
    Cell("eap", "edges", _eap),
    Cell("eap-ig", "edges", _eap_ig),
    Cell(
        "expected-gradients",
        "sentences",
        _inputs("expected-gradients", "sentences", CONTEXT, samples=4),
    ),  # fmt: skip
    Cell("ekfac", "TrainingExamples(fit_factors store)", _influence_method("ekfac")),
    Cell("grad-cos", "TrainingExamples(store)", _store_method("grad-cos")),
    Cell("grad-dot", "TrainingExamples(store)", _store_method("grad-dot")),
    Cell("hierarchical", "sources", _sources("hierarchical")),
    Cell("ig", "tokens", _ig),
    Cell("input-x-gradient", "words", _inputs("input-x-gradient", "words")),
    Cell("jsd", "sources", _sources("jsd")),
    Cell("kernelshap", "resid", _component("kernelshap", "resid", samples=16)),
    Cell("kfac", "TrainingExamples(fit_factors store)", _influence_method("kfac")),
    Cell("lime", "tokens", _inputs("lime", "tokens", samples=16)),
    Cell("occlusion", "Neurons(neurons=[0, 1, 2, 3])", _component("occlusion", "neurons")),
    Cell("patch", "heads", _patch),
    Cell("attention-suppression", "trace", _trace("attention-suppression")),
    Cell("receiver-heads", "trace", _trace("receiver-heads", top_k=2)),
    Cell("resampling", "trace", _trace("resampling", rollouts=2, progress=False)),
    Cell("relp", "mlp", _component("relp", "mlp")),
    Cell("saliency", "tokens", _inputs("saliency", "tokens")),
    Cell("shapley", "attn", _component("shapley", "attn", permutations=2)),
    Cell("shapley-exact", "layers", _shapley_exact),
    Cell("smoothgrad", "tokens", _inputs("smoothgrad", "tokens", samples=4)),
    Cell("surrogate", "Features(random SAE)", _features("surrogate", samples=16)),
    Cell("tracin", "TrainingExamples(store)", _store_method("tracin")),
    Cell("tracllm", "sources", _sources("tracllm", top_k=2, permutations=2)),
    Cell("trak", "TrainingExamples(store)", _store_method("trak")),
    Cell("logit-lens", "`al.logit_lens`", _logit_lens, function=True),
    Cell(
        "tuned-lens",
        "`al.lenses.train_tuned_lens` (2 steps), then `al.logit_lens(lens=)`",
        _tuned_lens,
        function=True,
    ),  # fmt: skip
    Cell("routes", "`al.routes`", _routes, function=True),
    Cell(
        "attribution-graph", "`al.attribution_graph` with random transcoders", _graph, function=True
    ),  # fmt: skip
)

CELL = {c.method: c for c in CELLS}


def missing_methods() -> list[str]:
    """Registered methods without a cell (a new method needs one)."""
    from .methods.base import all_methods

    return sorted(set(all_methods()) - set(CELL))


def run_cell(family: str, method: str, reraise: bool = False) -> Outcome:
    """Run one cell. With ``reraise`` a failure raises the original exception
    (so a test shows its traceback); otherwise it is recorded as ``fail``."""
    cell = CELL[method]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    try:
        lm = model(family)
        cell.run(lm)
    except AttrlabError as e:
        reason = _generic(f"{type(e).__name__}: {e}", family)
        return Outcome(family, method, "refuse", reason, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a failing cell is recorded, not fatal
        if reraise:
            raise
        return Outcome(family, method, "fail", failure_reason(e), time.perf_counter() - t0)
    return Outcome(family, method, "pass", "", time.perf_counter() - t0)


def _generic(reason: str, family: str) -> str:
    """A refusal's reason with the family's name (and its adapter's) as
    ``<family>``, so that one footnote serves every family refused for it."""
    names = {family}
    try:
        names.add(model(family).cfg.family)
    except Exception:  # noqa: BLE001 - the model itself may be what was refused
        pass
    for name in sorted(names, key=len, reverse=True):
        reason = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", "<family>", reason)
    return reason


def failure_reason(e: BaseException) -> str:
    """How a crash is shown in the table: the exception's type and first line."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:300]


def run_all(
    families: Iterable[str] | None = None, methods: Iterable[str] | None = None
) -> list[Outcome]:
    """Every cell of ``families`` (default: :data:`attrlab.testing.FAMILIES`) x
    ``methods`` (default: every cell), failures recorded."""
    from .testing import FAMILIES

    fams = list(FAMILIES if families is None else families)
    meths = [c.method for c in CELLS] if methods is None else list(methods)
    return [run_cell(f, m) for f in fams for m in meths]


_SUP = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")

COMMAND = "python benchmarks/architecture_table.py"


def render(outcomes: Sequence[Outcome]) -> str:
    """``docs/architectures.md``: one row per family (with its Hugging Face
    ``model_type``), one column per cell; ✓ a pass, ✗ⁿ refusal reason ``n``
    (listed below the table), ``crash`` a failure. Deterministic: no timings."""
    fams = list(dict.fromkeys(o.family for o in outcomes))
    meths = [c.method for c in CELLS if any(o.method == c.method for o in outcomes)]
    by = {(o.family, o.method): o for o in outcomes}
    reasons: dict[str, int] = {}
    for o in outcomes:
        if o.status != "pass":
            reasons.setdefault(o.reason, len(reasons) + 1)
    n = {s: sum(o.status == s for o in outcomes) for s in ("pass", "refuse", "fail")}
    lines = [
        "# Methods x architectures",
        "",
        f"Generated by `{COMMAND}` (the cells of `attrlab.architectures`, which",
        "`tests/test_architectures.py` also runs, failing when this file is stale). Do not",
        "edit by hand: regenerate it after adding a family or a method.",
        "",
        "Each cell runs one method on a tiny random-weight model of the family",
        "(`attrlab.testing.tiny_model`: 2 layers, short prompts, few samples or steps) and",
        "checks the result: finite scores, one per unit, and the method's own invariant where",
        "it has one:",
        "",
        "- `dla`: the parts sum to the logit difference minus the unembedding bias;",
        "- `ig`, `eap-ig`: completeness (the scores sum to f(all) - f(none)); on mixtures",
        "  of experts, whose top-k routing makes the target jump along the path, only that",
        "  the reported completeness error is the true one;",
        "- `attnlrp`: conservation; `eap`: equals autograd through the edge gates;",
        "- `shapley-exact`: efficiency; `patch`: patching the top head equals the same",
        "  patch made by hand with `lm.run(interventions=...)`;",
        "- `logit-lens`: the last layer is the model's own log-probability.",
        "",
        "✓: passes. ✗ⁿ: attrlab refuses with a typed error (`attrlab.errors.AttrlabError`)",
        "for reason *n* below. `crash`ⁿ: anything else, a bug (the test fails, or lists it",
        "among its known failures until it is fixed).",
        "",
        f"{len(outcomes)} cells ({len(fams)} families x {len(meths)} methods): "
        f"{n['pass']} pass, {n['refuse']} refuse"
        + (f", **{n['fail']} crash**" if n["fail"] else "")
        + ".",
        "",
        "| family | model_type | " + " | ".join(meths) + " |",
        "|---|---|" + "---|" * len(meths),
    ]
    for f in fams:
        cells = []
        for m in meths:
            cell = by.get((f, m))
            if cell is None:
                cells.append("")
            elif cell.status == "pass":
                cells.append("✓")
            else:
                mark = "✗" if cell.status == "refuse" else "crash"
                cells.append(mark + str(reasons[cell.reason]).translate(_SUP))
        lines.append(f"| {f} | {_model_type(f)} | " + " | ".join(cells) + " |")
    lines += ["", "Unit kinds the cells use:", ""]
    lines += [f"- `{c.method}`: {_column_note(c)}" for c in CELLS if c.method in meths]
    if reasons:
        lines += ["", "Reasons (`<family>`: the family's name in the message):", ""]
        for reason, i in reasons.items():
            where = sorted({o.family for o in outcomes if o.reason == reason})
            what = sorted({o.method for o in outcomes if o.reason == reason})
            if any(o.status == "fail" for o in outcomes if o.reason == reason):
                reason = f"**crash**: {reason}"
            lines.append(f"{i}. {reason.replace('|', '/')} — {', '.join(where)} "
                         f"({', '.join(what)})")  # fmt: skip
    return "\n".join(lines) + "\n"


def _column_note(c: Cell) -> str:
    if c.function:
        return f"{c.units} (a function, not an `al.attribute` method)"
    units = f"units={c.units!r}" if c.units.isidentifier() else f"units=al.units.{c.units}"
    return f"`{units}`"


def _model_type(family: str) -> str:
    from .testing import tiny_config

    return str(tiny_config(family, 16).model_type)
