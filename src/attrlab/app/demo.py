"""``attrlab demo``: explain one IOI prompt with every method family available.

An application, not a view: it loads the models, runs the attributions and
evaluations (agreement with exact patching through
:func:`attrlab.evaluate.agreement`, the continuation through
:func:`attrlab.units.tokens.generate_greedy`, circuit faithfulness) and hands the
computed results to the report and the text summaries of :mod:`attrlab.viz`.

Each section looks its method up in the registry (and the zoo) and runs it
with a small budget; a section whose method is not available says so in one
line of the report and of the summary instead of failing. Everything runs
offline on the bundled zoo models (or on a tiny random model with ``tiny=True``
or when the zoo is missing).

Example:
    >>> from attrlab.app.demo import run_demo
    >>> report, lines = run_demo(tiny=True)  # doctest: +SKIP
    >>> report.save("attrlab-report.html")  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import AttrlabError, InputError
from ..report import Report
from ..result import Attribution
from ..viz.summary import headline_diagnostics, top_units

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
DEFAULT_CF = "When Mary and John went to the store, Mary gave a drink to"
DEFAULT_ANSWER = (" Mary", " John")


class Unavailable(Exception):
    """A section cannot run in this install (method or zoo model missing)."""


# ------------------------------------------------------------------ registry helpers


def available(method: str, kind: str) -> bool:
    """Whether ``method`` is registered for unit kind ``kind``."""
    from ..methods.base import find_method

    try:
        find_method(method, kind)
    except AttrlabError:
        return False
    return True


def first_available(names: Sequence[str], kind: str) -> str | None:
    """The first of ``names`` registered for ``kind``."""
    return next((n for n in names if available(n, kind)), None)


def method_options(method: str, kind: str, **wanted: Any) -> dict[str, Any]:
    """The subset of ``wanted`` options that the method's constructors or the
    unit kind's fields accept."""
    from ..methods.base import find_method, option_names
    from ..units.base import resolve

    names, open_ended = option_names(find_method(method, kind))
    if open_ended:
        return dict(wanted)
    fields = set(resolve(kind).params())
    return {k: v for k, v in wanted.items() if k in names or k in fields}


def zoo_model(name: str) -> Any:
    """A bundled zoo model, or raise :class:`Unavailable`."""
    try:
        from .. import zoo
    except Exception as e:  # pragma: no cover
        raise Unavailable(f"the model zoo does not import ({type(e).__name__})") from e
    if not hasattr(zoo, "load") or name not in _zoo_tasks(zoo):
        raise Unavailable(f"zoo model {name!r} is not bundled in this install")
    return zoo.load(name)


def _zoo_tasks(zoo: Any) -> list[str]:
    try:
        return list(zoo.tasks())
    except Exception:  # pragma: no cover
        return []


# ------------------------------------------------------------------ the demo


@dataclass
class Demo:
    """State shared by the sections: the IOI model, prompt, counterfactual and answers."""

    lm: Any
    prompt: str
    counterfactual: str | None
    answer: tuple[Any, Any]  # token texts, or ids
    model_label: str
    report: Report
    lines: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    debug: bool = False
    tiny: bool = False

    glance: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(
        self, r: Attribution, title: str, note: str = "", k: int = 12, headline: str = ""
    ) -> Attribution:
        """Add a panel; ``headline`` replaces the top-units text of the summary."""
        self.report.add(r, title, note=note, k=k)
        tops = headline or top_units(r)
        diag = headline_diagnostics(r.diagnostics)
        self.lines.append(f"  {title:<34} [{r.method}] {tops}{'  (' + diag + ')' if diag else ''}")
        self.glance.append((title, r.method, tops, diag))
        return r


def _load_ioi(
    tiny: bool, prompt: str | None, cf: str | None, answer: Sequence[str] | None
) -> tuple[Any, str, str | None, tuple[Any, Any] | None, str]:
    import attrlab as al

    lm = None
    label = ""
    if not tiny:
        try:
            lm = zoo_model("ioi")
            label = "zoo ioi model"
        except Unavailable:
            lm = None
    if lm is None:
        lm = al.wrap(*al.testing.tiny_model("gpt2"), name="tiny-random-gpt2")
        label = (
            "tiny random GPT-2 (zoo IOI model not available)" if not tiny else "tiny random GPT-2"
        )
    if prompt is not None:  # the user's prompt: their counterfactual and answers (or none)
        return lm, prompt, cf, (tuple(answer) if answer else None), label  # type: ignore[return-value]
    p, c, a = DEFAULT_PROMPT, DEFAULT_CF, DEFAULT_ANSWER
    if label.startswith("zoo"):
        from .. import zoo

        ex = zoo.task("ioi").examples(1, seed=0)[0]
        p, c, a = ex.prompt, ex.counterfactual, (ex.answer, ex.wrong)
    return lm, p, cf or c, (tuple(answer) if answer else a), label  # type: ignore[return-value]


SECTIONS = (
    "tokens", "continuation", "heads", "layers", "lens", "routes", "circuit", "sources",
    "training",
)  # fmt: skip


def _sections() -> dict[str, tuple[str, str, Callable[[Demo], None]]]:
    return {
        "tokens": ("Input tokens", "Tokens", _tokens),
        "continuation": ("Input tokens", "Continuation", _continuation),
        "heads": ("Model components", "Heads", _heads),
        "layers": ("Model components", "Layers", _layers),
        "lens": ("Model components", "Logit lens", _logit_lens),
        "routes": ("Model components", "Information-flow routes", _routes),
        "circuit": ("Model components", "Circuit", _circuit),
        "sources": ("Context and data", "Context sources", _sources),
        "training": ("Context and data", "Training examples", _training),
    }


def run_demo(
    prompt: str | None = None,
    counterfactual: str | None = None,
    answer: Sequence[str] | None = None,
    tiny: bool = False,
    progress: bool = False,
    debug: bool = False,
    only: Sequence[str] | None = None,
) -> tuple[Report, list[str]]:
    """Run every available section (or the ``only`` ones, see :data:`SECTIONS`);
    returns the report and the terminal summary lines."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    lm, p, cf, given, label = _load_ioi(tiny, prompt, counterfactual, answer)
    logits, _ = lm.run(p, last_only=True)
    last = logits[0, -1].float()
    if given is None:  # no answers given: the model's top two predictions
        top2 = last.topk(2).indices.tolist()
        ans: tuple[Any, Any] = (int(top2[0]), int(top2[1]))  # ids: text may not round-trip
    else:
        ans = given
    probs = last.softmax(-1)
    diff = float(last[lm.token_id(ans[0])] - last[lm.token_id(ans[1])])
    names = [a if isinstance(a, str) else lm.to_str_tokens([a])[0] for a in ans]
    top = probs.topk(5)
    preds = [(lm.to_str_tokens([int(i)])[0], float(v)) for v, i in zip(top.values, top.indices)]
    info = {
        "model": f"{lm.name} — {label}",
        "prompt": p,
        "counterfactual": cf or "(none: patching sections skipped)",
        "target": f"logit({names[0]!r}) - logit({names[1]!r}) = {diff:.3f}"
        + f" (the model prefers {names[0] if diff >= 0 else names[1]!r})",
        "top predictions": "  ".join(f"{t!r} {v:.2f}" for t, v in preds),
    }
    report = Report("attrlab demo: why did the model say that?", info=info)
    demo = Demo(lm, p, cf, (ans[0], ans[1]), label, report, debug=debug, tiny=tiny)
    demo.lines += [
        f"model: {lm.name} ({label})",
        f"prompt: {p!r}",
        "top predictions: " + ", ".join(f"{t!r} {v:.2f}" for t, v in preds),
    ]
    chosen = set(only) if only else set(SECTIONS)
    unknown = chosen - set(SECTIONS)
    if unknown:
        raise InputError(
            f"unknown demo section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}"
        )
    sections = [(h, t, f) for key, (h, t, f) in _sections().items() if key in chosen]
    current = None
    bar = tqdm(sections, desc="demo", disable=not progress, leave=False, unit="section")
    for heading, title, fn in bar:
        bar.set_postfix_str(title)
        if heading != current:
            report.heading(heading)
            demo.lines.append(heading + ":")
            current = heading
        t = time.perf_counter()
        try:
            fn(demo)
        except Unavailable as e:
            report.missing(title, str(e))
            demo.lines.append(f"  {title:<34} not available: {e}")
        except Exception as e:
            if debug:
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            report.missing(title, f"failed: {type(e).__name__}: {msg}")
            demo.lines.append(f"  {title:<34} failed: {type(e).__name__}: {msg}")
        demo.timings[title] = round(time.perf_counter() - t, 2)
    bar.close()
    if demo.glance:
        report.add_table(
            "At a glance",
            {
                "section": [g[0] for g in demo.glance],
                "method": [g[1] for g in demo.glance],
                "largest |score|": [g[2] for g in demo.glance],
                "diagnostics": [g[3] for g in demo.glance],
            },
            note="the top three units of every panel below",
            panel="summary",
            at=0,
        )
    report.info["time"] = (
        f"{time.perf_counter() - t0:.1f} s ("
        + ", ".join(f"{k} {v:.1f}s" for k, v in demo.timings.items())
        + ")"
    )
    return report, demo.lines


# ------------------------------------------------------------------ sections


_DEFAULT: Any = object()


def _attr(
    demo: Demo,
    method: str,
    units: Any,
    kind: str,
    lm: Any = None,
    prompt: Any = None,
    target: Any = _DEFAULT,
    counterfactual: Any = None,
    **wanted: Any,
) -> Attribution:
    import attrlab as al

    opts = method_options(method, kind, **wanted)
    return al.attribute(
        lm if lm is not None else demo.lm,
        prompt if prompt is not None else demo.prompt,
        target=demo.answer if target is _DEFAULT else target,
        units=units,
        method=method,
        counterfactual=counterfactual,
        **opts,
    )


def _tokens(demo: Demo) -> None:
    ran = False
    for method, opts, note in (
        ("ig", dict(steps=16), "Integrated Gradients: each token's share of the logit difference"),
        ("occlusion", {}, "Occlusion: the change when each token is replaced"),
    ):
        if not available(method, "tokens"):
            continue
        demo.add(_attr(demo, method, "tokens", "tokens", **opts), f"Tokens — {method}", note)
        ran = True
    if not ran:
        m = first_available(["saliency", "input-x-gradient", "shapley", "occlusion"], "tokens")
        if m is None:
            raise Unavailable("no token attribution method (ig, occlusion …) is registered yet")
        demo.add(_attr(demo, m, "tokens", "tokens"), f"Tokens — {m}")


def _continuation(demo: Demo) -> None:
    from ..targets import ContinuationLogProb

    m = first_available(["ig", "input-x-gradient", "saliency"], "tokens")
    if m is None:
        raise Unavailable("no gradient method over tokens is registered yet")
    from ..units.tokens import generate_greedy

    lm = demo.lm
    gen = "".join(lm.to_str_tokens(generate_greedy(lm, lm.encode(demo.prompt), 3)))
    target = ContinuationLogProb(gen, reduce="none")
    r = _attr(demo, m, "tokens", "tokens", target=target, steps=32)
    if r.scores.dim() != 2:
        raise Unavailable(f"{m} does not return per-generated-token rows yet")
    demo.add(
        r,
        f"Continuation {gen!r} — {m}",
        "each generated token (row) attributed to the prompt and the earlier generated tokens",
    )


def _heads(demo: Demo) -> None:
    found = False
    exact = None
    if available("dla", "heads"):
        demo.add(
            _attr(demo, "dla", "heads", "heads"),
            "Heads — direct logit attribution",
            "each head's direct contribution to the logit difference (sums exactly with the other parts)",
        )
        found = True
    if available("patch", "heads") and demo.counterfactual:
        exact = _attr(demo, "patch", "heads", "heads", counterfactual=demo.counterfactual)
        demo.add(
            exact,
            "Heads — exact activation patching",
            "effect of patching each head's output from the counterfactual run",
        )
        found = True
    for m in ("atp*", "atp"):
        if not available(m, "heads") or not demo.counterfactual:
            continue
        r = _attr(demo, m, "heads", "heads", counterfactual=demo.counterfactual)
        note = f"{m}: the patching effect estimated from gradients (two forwards, one backward)"
        if exact is not None:
            r.diagnostics["agreement_with_patch"] = _agreement(r, exact)
            note += "; agreement with exact patching in the diagnostics"
        demo.add(r, f"Heads — {m}", note)
        found = True
    if not demo.counterfactual and (available("patch", "heads") or available("atp*", "heads")):
        why = "needs a counterfactual prompt (--counterfactual)"
        if found:
            demo.report.missing("Heads — patching and AtP", why)
            demo.lines.append(f"  {'Heads — patching and AtP':<34} not available: {why}")
        else:
            raise Unavailable(why)
    if not found:
        raise Unavailable("no head attribution method (dla, patch, atp*) is registered yet")


def _agreement(r: Attribution, exact: Attribution, k: int = 10) -> dict[str, Any]:
    """:func:`attrlab.evaluate.agreement` of ``r`` with exact patching (aligned by
    unit label), as the numbers the report shows."""
    from ..evaluate.agreement import agreement

    try:
        a = agreement(r, exact, k=k)
    except InputError as e:  # not the same units: say so instead of a number
        return {"unavailable": str(e)}
    return {
        "pearson": round(a.pearson, 4),
        "spearman": round(a.spearman, 4),
        f"top{a.k}_recall": round(a.recall, 4),
    }


def _layers(demo: Demo) -> None:
    for kind in ("layers",):
        m = first_available(["dla", "patch"], kind)
        if m is None:
            continue
        kw = {"counterfactual": demo.counterfactual} if m == "patch" else {}
        demo.add(
            _attr(demo, m, kind, kind, **kw),
            f"Layers — {m}",
            "contribution of the embeddings and each layer's attention and MLP",
        )
        return
    raise Unavailable("no layer attribution method (dla) is registered yet")


def _logit_lens(demo: Demo) -> None:
    import attrlab as al

    fn = getattr(al, "logit_lens", None)
    if fn is None:
        raise Unavailable("al.logit_lens is not available yet")
    res = fn(demo.lm, demo.prompt, **_accepts(fn, target=demo.answer[0], k=5))
    if isinstance(res, Attribution):
        ranks = res.extra.get("rank")
        head = ""
        if ranks is not None and ranks.numel() == len(res):
            head = f"rank of {demo.answer[0]!r} by layer: " + " \u2192 ".join(
                str(int(x)) for x in ranks.flatten().tolist()
            )
        demo.add(
            res,
            "Logit lens",
            f"the answer {demo.answer[0]!r} read out of the residual stream after every layer",
            headline=head,
        )
        return
    table = res.to_pandas() if hasattr(res, "to_pandas") else res
    if hasattr(table, "columns"):
        demo.report.add_table(
            "Logit lens",
            {c: table[c].tolist() for c in table.columns},
            note=f"the answer {demo.answer[0]!r} read out after every layer",
            panel="logit_lens",
        )
        demo.lines.append(f"  {'Logit lens':<30} {len(table)} rows")
        return
    raise Unavailable(f"al.logit_lens returned {type(res).__name__}, which the report cannot show")


def _routes(demo: Demo) -> None:
    """The route graph of the prediction, and, for a zoo model, a tuned lens
    trained on its task next to the logit lens."""
    import attrlab as al

    g = al.routes(demo.lm, demo.prompt, tau=0.04)
    last = len(g.meta["tokens"]) - 1
    into = [
        (w, s, h)
        for s, t, w, k, h in zip(g.edges["source"], g.edges["target"], g.edges["weight"],
                                 g.edges["kind"], g.edges["head"])
        if k == "attention" and t.endswith(f".{last}")
    ]  # fmt: skip
    into.sort(reverse=True)
    tops = ", ".join(f"{s} via head {h} ({w:.2f})" for w, s, h in into[:3]) or "none above tau"
    demo.report.add(g, "Information-flow routes",
                    note="how information reaches the prediction: parts of each residual "
                    "update above tau = 0.04, top-down from the last position")  # fmt: skip
    demo.lines.append(f"  {'Information-flow routes':<34} [routes] {tops}")
    demo.glance.append(("Information-flow routes", "routes", tops, f"{g.n_edges} edges"))
    if str(getattr(demo.lm, "name", "")).startswith("zoo/") and not demo.tiny:
        lens = al.lenses.train_tuned_lens(demo.lm, steps=250, progress=False)
        r = al.logit_lens(demo.lm, demo.prompt, target=demo.answer[0], lens=lens)
        kl = " \u2192 ".join(f"{float(x):.3f}" for x in r.extra["kl_to_final"].tolist())
        demo.add(r, "Tuned lens", "the answer read out after every layer through a tuned "
                 "lens trained on the task (250 steps)", headline=f"KL to the output: {kl}")  # fmt: skip


def _accepts(fn: Callable[..., Any], **wanted: Any) -> dict[str, Any]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return {}
    return {k: v for k, v in wanted.items() if k in params}


def _circuit(demo: Demo) -> None:
    m = first_available(["eap-ig", "eap", "atp"], "edges")
    if m is None:
        raise Unavailable("edge attribution (units='edges', eap / eap-ig) is not registered yet")
    if not demo.counterfactual:
        raise Unavailable("edge attribution needs a counterfactual prompt (--counterfactual)")
    r = _attr(demo, m, "edges", "edges", counterfactual=demo.counterfactual, steps=4)
    try:
        from ..evaluate.circuits import evaluate_circuit
        from ..methods.circuits import extract_circuit
    except ImportError:  # circuits not in this install: draw the strongest edges
        demo.add(r, f"Circuit — {m}", "edges between components; the strongest edges are drawn")
        return
    # the smallest circuit (by fraction of edges) that keeps >= 80% of the logit difference,
    # measured by running the model with every other edge patched to the counterfactual
    for frac in (0.05, 0.1, 0.2, 0.3):
        c = extract_circuit(r, fraction=frac)
        ev = evaluate_circuit(demo.lm, c, demo.prompt, demo.answer, demo.counterfactual)
        if float(ev["faithfulness"]) >= 0.8:
            break
    faith = float(ev["faithfulness"])
    r.meta["svg"] = c.to_svg()
    r.meta["circuit_edges"] = [list(e) for e in c.edges()]
    r.diagnostics["circuit"] = {
        "edges": c.n_edges,
        "fraction": round(float(c.fraction), 4),
        "faithfulness": round(faith, 4),
        "ablation": ev.get("ablation", "counterfactual"),
    }
    demo.add(
        r,
        f"Circuit — {m}",
        f"the drawn circuit keeps {c.n_edges} of {len(r)} edges ({c.fraction:.0%}); running it "
        f"with every other edge patched keeps {faith:.0%} of the logit difference",
        headline=f"{c.n_edges}-edge circuit ({c.fraction:.0%} of the edges)",
    )


TOY_SOURCES = [
    "Document 1: the meeting is on Monday.",
    "Document 2: Paris is a city in France.",
    "Document 3: the report is due Friday.",
]
TOY_CORPUS = [
    "The capital of France is Paris.",
    "Paris is a city in France.",
    "The capital of Italy is Rome.",
    "Rome is a city in Italy.",
    "Berlin is in Germany.",
    "A cat sat on the mat.",
    "The quick brown fox jumps over the lazy dog.",
    "Alice and Bob talked about the weather.",
]


def _sources(demo: Demo) -> None:
    m = first_available(["contextcite", "occlusion"], "sources")
    if m is None:
        raise Unavailable(
            "context attribution (units='sources', contextcite) is not registered yet"
        )
    if demo.tiny:
        lm, sources, gold = demo.lm, TOY_SOURCES, 1
        prompt = " ".join(sources) + " Question: where is Paris? Answer:"
        response, where = " France", "toy context on the tiny model"
    else:
        from .. import zoo

        lm = zoo_model("context_qa")
        ex = zoo.task("context_qa").examples(1, seed=0)[0]
        prompt, sources, gold, response = ex.prompt, list(ex.sources), ex.gold, ex.answer
        where = f"zoo context_qa; question {ex.question!r}, answer {response!r}"
    wanted = {"sources": sources, "samples": 32, "seed": 0}
    r = _attr(demo, m, "sources", "sources", lm=lm, prompt=prompt, target=response, **wanted)
    if len(r) == len(sources):
        r.units["answers the question"] = ["yes" if i == gold else "" for i in range(len(r))]
    demo.add(r, f"Context sources — {m}", f"which document the answer comes from ({where})")


def _training(demo: Demo) -> None:
    import tempfile

    m = first_available(["trak", "tracin", "grad-dot"], "train")
    if m is None:
        raise Unavailable("training-data attribution (units='train', trak) is not registered yet")
    from .. import data as ad
    from ..units.examples import TrainingExamples

    if demo.tiny:
        lm, texts, ids = demo.lm, TOY_CORPUS, list(range(len(TOY_CORPUS)))
        prompt, answer, gold = "The capital of France is", " Paris", {0, 1}
        where = "toy corpus on the tiny model"
    else:
        from .. import zoo

        lm = zoo_model("facts")
        task = zoo.task("facts")
        ex = task.examples(1, seed=0)[0]
        gold = set(ex.supporting_docs)
        chosen = list(dict.fromkeys([*ex.supporting_docs, *ex.distractor_docs]))
        for doc_id, _ in task.corpus():
            if len(chosen) >= 32:
                break
            if doc_id not in chosen:
                chosen.append(doc_id)
        ids, texts = chosen, [task.document(i) for i in chosen]
        prompt, answer = ex.prompt, ex.answer
        where = f"zoo facts: {len(ids)} of {len(task.corpus())} training documents"
    # gradients of the last block only (a 256-d projection): fast, and on the zoo facts
    # model it ranks the documents that state the fact first
    prefix = lm.block_path(lm.cfg.n_layers - 1)
    with tempfile.TemporaryDirectory(prefix="attrlab-demo-") as tmp:
        store = ad.featurize(
            lm,
            ad.Examples.from_texts(lm, texts, ids=ids),
            tmp,
            proj_dim=256,
            batch_size=64,
            modules=[prefix],
        )
        r = _attr(demo, m, TrainingExamples(store), "train", lm=lm, prompt=prompt, target=answer)
    if "id" in r.units:
        r.units["states the fact"] = ["yes" if i in gold else "" for i in r.units["id"]]
    demo.add(r, f"Training examples — {m}", f"training documents behind {answer!r} ({where})")
