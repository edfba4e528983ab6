"""The ``attrlab`` command line: ``attrlab demo``, ``attrlab explain``, ``attrlab show``,
``attrlab transcoders`` (train per-layer transcoders for a zoo model) and
``attrlab serve`` (the local web explorer, ``docs/serve.md``).

``explain`` calls :func:`attrlab.load` and :func:`attrlab.attribute` exactly as
the Python API would, so its scores equal the Python call's.

Exit codes: 0 ok; 2 bad input (the whole message on stderr, no traceback;
``--debug`` for one), checked before any model is loaded or run where it can
be; 1 when a computed result could not be written where asked (it is kept in
a fallback file, named on stderr) or on an internal error.

Output paths (``--out``, ``--html``) are checked before computing: a path that
is a directory, lies under a file, or is in a directory that cannot be written
is an error before any work; missing parent directories are created. Files are
written atomically (complete or not at all).

Example:
    >>> from attrlab.cli import main
    >>> main(["explain", "--model", "/no/such/dir", "--prompt", "hi", "--quiet"])  # doctest: +SKIP
    attrlab: error: no model at '/no/such/dir': the path does not exist
    2
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import AttrlabError, EmptyPromptError, InputError, UnknownMethodError
from .viz.html import visible

# ------------------------------------------------------------------ parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``attrlab: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            message += (
                "; a value with * or ? must be quoted (--method 'atp*'), else the shell "
                "expands it into file names"
            )
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (``--top``).

    Example:
        >>> positive_int("3")
        3
        >>> positive_int("-3")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: '-3' is not a positive whole number
    """
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid int {text!r}: give a positive whole number"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return n


def _common(p: argparse.ArgumentParser, top: bool = False) -> None:
    d: Any = False if top else argparse.SUPPRESS
    p.add_argument("--debug", action="store_true", default=d, help="show tracebacks on errors")
    p.add_argument("--quiet", "-q", action="store_true", default=d, help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``attrlab`` command (every command has ``--help``)."""
    p = _Parser(
        prog="attrlab",
        description="Explain why a language model produced an output: attribute a target "
        "(a logit, a logit difference, a continuation's log-probability) to input tokens, "
        "model components, prompt sources and training examples.",
    )
    _common(p, top=True)
    sub = p.add_subparsers(
        dest="command", required=True, metavar="{demo,explain,show,transcoders,serve}"
    )

    d = sub.add_parser(
        "demo",
        help="explain an IOI prompt with every available method, offline; write an HTML report",
        description="Explain an indirect-object-identification prompt on the bundled zoo model "
        "(offline) with every method family available, print a summary and write a "
        "self-contained HTML report.",
    )
    _common(d)
    d.add_argument(
        "--out",
        default="attrlab-report.html",
        help="report path; missing directories are created (default: %(default)s)",
    )
    d.add_argument("--prompt", default=None, help="override the IOI prompt")
    d.add_argument("--counterfactual", default=None, help="override the counterfactual prompt")
    d.add_argument(
        "--answer",
        nargs=2,
        metavar=("CORRECT", "WRONG"),
        default=None,
        help="override the answer pair (e.g. ' Mary' ' John')",
    )
    d.add_argument(
        "--tiny",
        action="store_true",
        help="use a tiny random model instead of the zoo models (fast smoke test)",
    )
    d.add_argument(
        "--only",
        nargs="+",
        metavar="SECTION",
        help="run only these sections: tokens continuation heads layers lens circuit sources "
        "training",
    )
    d.set_defaults(func=_cmd_demo)

    e = sub.add_parser(
        "explain",
        help="attribute a target on one prompt with one method",
        description="Load a model (Hugging Face id or local directory; 'zoo:NAME' for a zoo\n"
        "model) and run al.attribute(lm, prompt, target=..., units=..., method=...,\n"
        "counterfactual=..., **options).",
        epilog="examples:\n"
        "  attrlab explain --model zoo:ioi --prompt 'When Mary and John went to the store, "
        "John gave a drink to' --contrast ' Mary' ' John' --units tokens --method ig -o steps=32\n"
        "  attrlab explain --model gpt2 --prompt '...' --contrast ' Mary' ' John' --units heads "
        "--method 'atp*' --counterfactual '...' --out heads.attr --html heads.html\n\n"
        "Quote method names with * ('atp*'): unquoted, the shell may expand them into file\n"
        "names. --out and --html are checked before the model runs (missing directories\n"
        "are created); if writing still fails, the result is kept in a file named on\n"
        "stderr and the exit code is 1. Bad input: exit code 2.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(e)
    e.add_argument("--model", required=True, help="HF model id, local path, or zoo:NAME")
    e.add_argument("--prompt", required=True, help="the prompt text")
    t = e.add_mutually_exclusive_group()
    t.add_argument("--target", help="a single next token, e.g. ' Mary' (default: top prediction)")
    t.add_argument("--contrast", nargs=2, metavar=("A", "B"), help="logit difference A minus B")
    t.add_argument(
        "--continuation",
        help="a continuation: one row per continuation token, its log-probability "
        "(target=al.targets.ContinuationLogProb(TEXT, reduce='none'))",
    )
    e.add_argument("--counterfactual", help="a corrupted prompt of the same token length")
    e.add_argument(
        "--units",
        default="tokens",
        help="unit kind: tokens, heads, layers, ... (default: %(default)s)",
    )
    e.add_argument(
        "--method",
        default="ig",
        help="method name (default: %(default)s); also 'routes' (information-flow route "
        "graph: -o tau=0.04 -o per_head=false -o positions=[...]; --out writes the graph as "
        "JSON) and 'logit-lens'",
    )
    e.add_argument(
        "--lens",
        metavar="tuned|DIR",
        help="read the layers through a tuned lens (implies --method logit-lens): a directory "
        "saved by al.lenses.TunedLens.save, or 'tuned' to train one now on a zoo model's task",
    )
    e.add_argument(
        "--unit-option",
        "-u",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the unit kind, e.g. -u layers=[0,1] for heads, -u store=DIR for "
        "train, -u split=sentences for sources (builds al.units.<Kind>(KEY=VALUE, ...)). "
        "Repeatable.",
    )
    e.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option; VALUE is read as JSON when it parses "
        '(steps=16, sources=\'["a","b"]\'), else as text. Repeatable.',
    )
    e.add_argument(
        "--out",
        help="save the result (.attr, safetensors + JSON); missing directories are created",
    )
    e.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    e.add_argument("--html", help="write a self-contained HTML report")
    e.add_argument(
        "--top",
        type=positive_int,
        default=10,
        help="rows in the terminal table (default: %(default)s)",
    )
    e.set_defaults(func=_cmd_explain)

    s = sub.add_parser(
        "show",
        help="print a saved result; --html to render it",
        description="Print a saved .attr result as a table; --html writes a report.",
    )
    _common(s)
    s.add_argument("file", help="a .attr file written by Attribution.save or explain --out")
    s.add_argument(
        "--top", type=positive_int, default=15, help="rows in the table (default: %(default)s)"
    )
    s.add_argument("--html", help="write a self-contained HTML report")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_cmd_show)

    tc = sub.add_parser(
        "transcoders",
        help="train per-layer transcoders for a zoo model (SAELens layout + summary.json)",
        description="Train one transcoder per layer (blocks.l.mlp.in -> blocks.l.mlp.out) on a "
        "zoo model's task texts with al.dictionaries.train_transcoders, evaluate each on 256 "
        "held-out texts (FVE, L0, next-token KL) and write OUT/layer_{l}/ (SAELens layout) and "
        "OUT/summary.json. al.dictionaries.load(OUT) reads the set back.",
    )
    _common(tc)
    tc.add_argument("model", metavar="zoo:TASK", help="a zoo model, e.g. zoo:ioi")
    tc.add_argument("--out", help="output directory (default: transcoders-TASK)")
    tc.add_argument("--width", type=positive_int, default=512,
                    help="features per transcoder (default: %(default)s)")  # fmt: skip
    tc.add_argument("--kind", choices=("jumprelu", "topk", "relu"), default="jumprelu",
                    help="activation (default: %(default)s)")  # fmt: skip
    tc.add_argument("--k", type=positive_int, help="active features per position (--kind topk)")
    tc.add_argument("--steps", type=positive_int, default=1500,
                    help="training steps per layer (default: %(default)s)")  # fmt: skip
    tc.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    tc.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                    help="stored precision (default: %(default)s)")  # fmt: skip
    tc.set_defaults(func=_cmd_transcoders)

    v = sub.add_parser(
        "serve",
        help="a local web explorer for the results in a directory, with live causal checks",
        description="Serve a local web explorer of the results (.attr, graph .json) in "
        "RESULTS_DIR on 127.0.0.1 (a random free port; the URL with its token is printed). "
        "With --model, select units and ablate them live, and run new attributions "
        "(saved into RESULTS_DIR). Needs: pip install 'attrlab[serve]'.",
    )
    _common(v)
    v.add_argument("results_dir", nargs="?", default=".", metavar="RESULTS_DIR",
                   help="the results directory (default: the current one)")  # fmt: skip
    v.add_argument("--model", help="a model for live checks: HF id, local path, or zoo:TASK")
    v.add_argument("--port", type=positive_int, help="the port (default: a random free one)")
    v.add_argument("--host", default="127.0.0.1",
                   help="the interface to bind (default: %(default)s; others warn)")  # fmt: skip
    v.add_argument("--transcoders", metavar="DIR",
                   help="per-layer transcoders for live checks on attribution graphs "
                   "(al.dictionaries.load; zoo:TASK models default to their bundled set)")  # fmt: skip
    v.set_defaults(func=_cmd_serve)
    return p


# ------------------------------------------------------------------ helpers


def _status(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def parse_option(text: str) -> tuple[str, Any]:
    """``"steps=16"`` -> ``("steps", 16)``; the value is JSON when it parses, else text.

    Example:
        >>> parse_option("steps=16"), parse_option("baseline=pad")
        (('steps', 16), ('baseline', 'pad'))
    """
    if "=" not in text:
        raise InputError(f"--option {text!r}: write KEY=VALUE")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key.isidentifier():
        raise InputError(f"--option {text!r}: {key!r} is not an option name")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def load_model(name: str) -> Any:
    """A wrapped model from a HF id / path, ``zoo:NAME`` or ``tiny:FAMILY``.

    Loading errors (missing path, not a model directory, no network) become
    :class:`~attrlab.errors.InputError` with one line.
    """
    import attrlab as al

    if name.startswith("zoo:"):
        zoo = _zoo()
        if zoo is None:
            raise InputError("the model zoo is not available in this install")
        return zoo.load(name[4:])
    if name.startswith("tiny:"):
        fam = name[5:] or "gpt2"
        if fam not in al.testing.FAMILIES:
            raise InputError(
                f"unknown tiny family {fam!r}; choose from {', '.join(al.testing.FAMILIES)}"
            )
        return al.wrap(*al.testing.tiny_model(fam), name=f"tiny-random-{fam}")
    p = Path(name).expanduser()
    if (name.startswith((".", "/", "~")) or p.exists()) and not p.exists():
        raise InputError(f"no model at {name!r}: the path does not exist")
    try:  # a hub id is read from the local cache first (al.load)
        return al.load(name)
    except AttrlabError as e:  # typed already: say which model, keep the type
        raise type(e)(f"cannot load model {name!r}: {e}") from e
    except Exception as e:  # not a model (a plain file, a pickle ...): any loader error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load model {name!r}: {first}") from e


def _zoo() -> Any:
    try:
        from . import zoo
    except Exception:  # pragma: no cover - a broken zoo must not break the CLI
        return None
    return zoo if hasattr(zoo, "load") else None


def _target_spec(args: argparse.Namespace) -> Any:
    if args.contrast:
        return (args.contrast[0], args.contrast[1])
    if args.continuation is not None:
        from .targets import ContinuationLogProb

        return ContinuationLogProb(args.continuation, reduce="none")
    return args.target


def build_units(name: str, options: dict[str, Any]) -> Any:
    """``name`` alone, or the unit object ``al.units.<Kind>(**options)``.

    Example:
        >>> build_units("heads", {"layers": [0]})
        Heads(layers=[0], per_position=False, heads=None)
    """
    if not options:
        return name
    from .units.base import _KINDS, resolve

    resolve(name)  # raises UnknownUnitsError with the list of kinds
    try:
        return _KINDS[name](**options)
    except TypeError as e:
        raise InputError(f"bad unit options for units={name!r}: {e}") from e


def _with_progress(method: str, units: Any, options: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """Ask the method for a progress bar when it has a ``progress`` option."""
    if quiet or "progress" in options:
        return options
    from .methods.base import find_method
    from .units.base import resolve

    try:
        cls = find_method(method, resolve(units).kind)
    except AttrlabError:
        return options  # attribute() reports the error
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):  # pragma: no cover
        return options
    if "progress" in sig.parameters:
        return {**options, "progress": True}
    return options


def result_json(r: Any) -> dict[str, Any]:
    """A result as plain JSON: metadata, ``scores`` (nested lists) and ``shape``."""
    m = r._metadata()
    m["scores"] = [_num(x) for x in r.scores.double().flatten().tolist()]
    if r.scores.dim() == 2:
        n = r.scores.shape[1]
        m["scores"] = [m["scores"][i : i + n] for i in range(0, len(m["scores"]), n)]
    m["shape"] = list(r.scores.shape)
    return m


def _num(x: float) -> Any:
    return x if math.isfinite(x) else str(x)


def summary_lines(r: Any, k: int = 10) -> list[str]:
    """A terminal table of the top ``k`` units with the method, target and diagnostics."""
    import pandas as pd

    lines = [
        f"{r.method} over {r.unit_kind} ({len(r)} units"
        + (f" x {r.scores.shape[0]} rows" if r.scores.dim() == 2 else "")
        + f")  target: {r.target}"
        + (f"  model: {r.model_id}" if r.model_id else ""),
    ]
    if r.params:
        lines.append(
            "params: "
            + json.dumps({k_: v for k_, v in r.params.items() if k_ != "progress"}, default=str)
        )
    if r.diagnostics:
        lines.append("diagnostics: " + json.dumps(r.diagnostics, default=str))
    from .viz.html import top_frame

    top = top_frame(r, k)
    for c in top.columns:
        if top[c].dtype == object:
            top[c] = [repr(v) if isinstance(v, str) else v for v in top[c]]
    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        lines.append(top.to_string(index=False))
    # a saved file's strings reach the terminal: no escape sequences, no bidi reordering
    return [visible(line) for line in lines]


def check_output(path: str, flag: str, example: str = "result") -> Path:
    """The path to write ``flag``'s file to, checked before any work is done.

    Missing parent directories are fine (they are created when writing); a
    path that is a directory or not a regular file, lies under a file, or is in
    a directory that cannot be written raises :class:`InputError`. A symlink
    is followed (its target is written).

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> check_output(os.path.join(d, "new", "r.attr"), "--out").name
        'r.attr'
        >>> check_output(d, "--out")
        Traceback (most recent call last):
        ...
        attrlab.errors.InputError: --out ...: is a directory; give a file path, e.g. .../result
    """
    if not path.strip():
        raise InputError(f"{flag} is empty: give a file path")
    p = Path(path).expanduser()
    try:
        if p.is_symlink():
            p = p.resolve()
        if p.is_dir():
            raise InputError(f"{flag} {path}: is a directory; give a file path, e.g. {p / example}")
        if p.exists() and not p.is_file():
            raise InputError(f"{flag} {path}: is not a regular file; give a file path")
        ancestor = p.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot use this path: {e}") from e
    if not ancestor.is_dir():
        raise InputError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write in {ancestor} (permission denied)")
    return p


def _check_outputs(args: argparse.Namespace, flags: Sequence[tuple[str, str]]) -> None:
    """Check the output paths of ``args`` (``(flag, example file name)``) before computing."""
    seen: dict[Path, str] = {}
    for flag, example in flags:
        value = getattr(args, flag.lstrip("-"), None)
        if value is None:
            continue
        p = check_output(value, flag, example).absolute()
        if p in seen:
            raise InputError(f"{seen[p]} and {flag} are the same file ({value}); give two paths")
        seen[p] = flag


def _write(path: str | Path, save: Callable[[Path], Any]) -> Path:
    """``save(path)`` after creating missing directories; a symlink's target is written."""
    p = Path(path).expanduser()
    if p.is_symlink():
        p = p.resolve()
    p.parent.mkdir(parents=True, exist_ok=True)
    save(p)
    return p


def _fallback(name: str, suffix: str) -> Path:
    """A new file name for a result that could not be written where asked: in the
    working directory if it is writable, else in the temporary directory."""
    import tempfile

    stem = Path(name).stem or "attrlab-result"
    d = Path.cwd()
    if not os.access(d, os.W_OK | os.X_OK):
        d = Path(tempfile.gettempdir())
    return d / f"{stem}.rescued-{uuid.uuid4().hex[:6]}{suffix}"


def _write_outputs(
    args: argparse.Namespace,
    r: Any,
    report: Callable[[], Any],
    flags: Sequence[tuple[str, str]] = (("--out", ".attr"), ("--html", ".html")),
) -> int:
    """Write the outputs ``flags`` names (``(flag, ".attr" | ".html")``): the result
    ``r`` or the ``report()``. A failed write keeps what it would have written in a
    fallback file named on stderr (and the result as ``.attr`` when no ``.attr``
    was written), and makes the exit code 1; 0 when everything was written."""
    saves = {".attr": lambda p: r.save(p), ".html": lambda p: report().save(p)}
    failed: list[tuple[str, str]] = []
    wrote_attr = False
    for flag, suffix in flags:
        path = getattr(args, flag.lstrip("-"), None)
        if not path:
            continue
        try:
            done = "saved" if suffix == ".attr" else "wrote"
            _status(args, f"{done} {_write(path, saves[suffix])}")
            wrote_attr = wrote_attr or suffix == ".attr"
        except (OSError, AttrlabError) as e:
            print(f"attrlab: error: cannot write {flag} {path}: {_message(e)}", file=sys.stderr)
            failed.append((path, suffix))
    if not failed:
        return 0
    if r is not None and not wrote_attr and all(x != ".attr" for _, x in failed):
        failed.insert(0, (failed[0][0], ".attr"))  # the result itself, not only its report
    for path, suffix in failed:
        keep = _fallback(path, suffix)
        what = "the result" if suffix == ".attr" else "the report"
        try:
            _write(keep, saves[suffix])
            hint = f" (attrlab show {keep} reads it)" if suffix == ".attr" else ""
            print(f"attrlab: {what} is kept in {keep}{hint}", file=sys.stderr)
        except (OSError, AttrlabError) as e:
            print(
                f"attrlab: error: could not keep {what} in {keep}: {_message(e)}", file=sys.stderr
            )
    return 1


# ------------------------------------------------------------------ commands


def _cmd_explain(args: argparse.Namespace) -> int:
    import attrlab as al

    from .methods.base import find_method
    from .units.base import resolve

    # everything that can be checked is checked before loading the model
    if not args.prompt:
        raise EmptyPromptError("--prompt is empty: give the text to explain")
    _check_outputs(args, [("--out", "result.attr"), ("--html", "report.html")])
    options = dict(parse_option(o) for o in args.option)
    if args.lens is not None or args.method in ("logit-lens", "tuned-lens"):
        return _explain_lens(args, options)
    if args.method == "routes":
        return _explain_routes(args, options)
    units = build_units(args.units, dict(parse_option(o) for o in args.unit_option))
    try:
        find_method(args.method, resolve(units).kind)
    except UnknownMethodError as e:
        if any(c in args.method for c in "/\\") or Path(args.method).exists():
            raise UnknownMethodError(
                f"{e}\n--method {args.method!r} is a file name: the shell expanded an unquoted "
                "pattern such as atp*; quote it: --method 'atp*'"
            ) from e
        raise
    t0 = time.perf_counter()
    _status(args, f"loading {args.model} ...")
    lm = load_model(args.model)
    options = _with_progress(args.method, units, options, args.quiet)
    _status(args, f"running {args.method} over {args.units} ...")
    r = al.attribute(
        lm,
        args.prompt,
        target=_target_spec(args),
        units=units,
        method=args.method,
        counterfactual=args.counterfactual,
        **options,
    )
    _status(args, f"done in {time.perf_counter() - t0:.1f} s")
    if args.json:
        print(json.dumps(result_json(r)))
    else:
        print("\n".join(summary_lines(r, args.top)))
    info = {"model": lm.name, "prompt": args.prompt}
    if args.counterfactual:
        info["counterfactual"] = args.counterfactual

    def report() -> Any:
        from .report import Report

        title = f"attrlab explain: {args.method} over {args.units}"
        return Report(title, info=info).add(r, k=max(args.top, 5))

    return _write_outputs(args, r, report)


def _explain_routes(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``attrlab explain --method routes``: the route graph of the prediction(s)."""
    from .graph import GraphResult
    from .methods.routes import routes

    unknown = sorted(set(options) - {"tau", "per_head", "positions", "chunk"})
    if unknown:
        raise InputError(f"routes take -o tau=, per_head=, positions=, chunk=; not {unknown[0]!r}")
    if args.target or args.contrast or args.continuation or args.counterfactual:
        raise InputError("routes explain the model's own prediction: no --target, "
                         "--contrast, --continuation or --counterfactual")  # fmt: skip
    t0 = time.perf_counter()
    _status(args, f"loading {args.model} ...")
    lm = load_model(args.model)
    g: GraphResult = routes(lm, args.prompt, **options)
    _status(args, f"done in {time.perf_counter() - t0:.1f} s")
    if args.json:
        print(json.dumps(g.to_dict(), default=str))
    else:
        lines = [f"routes: {g.n_nodes} nodes, {g.n_edges} edges  target: {g.target}  "
                 f"model: {g.model_id}", "params: " + json.dumps(g.params)]  # fmt: skip
        df = g.to_pandas("edges").drop(columns=["roots"])
        df = df.sort_values("weight", ascending=False).head(args.top)
        lines.append(df.to_string(index=False))
        print("\n".join(visible(line) for line in lines))

    def report() -> Any:
        from .report import Report

        info = {"model": lm.name, "prompt": args.prompt}
        return Report("attrlab explain: routes", info=info).add(g, k=max(args.top, 5))

    return _write_outputs(args, g, report)


def _explain_lens(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``attrlab explain --method logit-lens [--lens tuned|DIR]``."""
    from .lenses import TunedLens, train_tuned_lens
    from .methods.lens import logit_lens

    unknown = sorted(set(options) - {"k", "positions"})
    if unknown:
        raise InputError(f"the lens takes -o k=, positions=; not {unknown[0]!r}")
    if args.contrast or args.continuation or args.counterfactual:
        raise InputError("the lens reads one token: use --target (or none for the top prediction)")
    lens = None
    if args.lens not in (None, "tuned"):
        lens = TunedLens.load(args.lens)  # a bad directory fails before the model loads
    t0 = time.perf_counter()
    _status(args, f"loading {args.model} ...")
    lm = load_model(args.model)
    if args.lens == "tuned":
        _status(args, "training a tuned lens on the model's task ...")
        lens = train_tuned_lens(lm, progress=not args.quiet)
    r = logit_lens(lm, args.prompt, target=args.target, lens=lens, **options)
    _status(args, f"done in {time.perf_counter() - t0:.1f} s")
    if args.json:
        print(json.dumps(result_json(r)))
    else:
        print("\n".join(summary_lines(r, args.top)))

    def report() -> Any:
        from .report import Report

        info = {"model": lm.name, "prompt": args.prompt}
        return Report(f"attrlab explain: {r.method}", info=info).add(r, k=max(args.top, 5))

    return _write_outputs(args, r, report)


def _cmd_show(args: argparse.Namespace) -> int:
    from .result import Attribution

    if not Path(args.file).exists():
        raise InputError(f"no such file: {args.file}")
    if Path(args.file).is_dir():
        raise InputError(f"{args.file} is a directory; give a .attr file")
    if args.html:
        check_output(args.html, "--html", "report.html")
        if Path(args.html).expanduser().absolute() == Path(args.file).absolute():
            raise InputError(
                f"--html {args.html} would overwrite the result file; give another path"
            )
    r = Attribution.load(args.file)
    if args.json:
        print(json.dumps(result_json(r)))
    else:
        print("\n".join(summary_lines(r, args.top)))
    info: dict[str, Any] = {"file": args.file}
    for key in ("prompt", "counterfactual"):
        if isinstance(r.meta.get(key), str):
            info[key] = r.meta[key]
    if args.html:
        from .report import Report

        page = Report(f"attrlab: {Path(args.file).name}", info=info).add(r, k=args.top)
        _status(args, f"wrote {_write(args.html, page.save)}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """``attrlab serve``: checked before the model loads; blocks until Ctrl-C."""
    from .serve import require_serve_dependencies, serve

    require_serve_dependencies()  # MissingDependencyError: pip install 'attrlab[serve]'
    d = Path(args.results_dir).expanduser()
    if d.exists() and not d.is_dir():
        raise InputError(f"{args.results_dir} is a file; give the results directory")
    if args.port is not None and args.port > 65535:
        raise InputError(f"--port {args.port}: a port is at most 65535")
    if args.transcoders is not None and not Path(args.transcoders).expanduser().is_dir():
        raise InputError(f"--transcoders {args.transcoders}: not a directory of transcoders")
    serve(d, model=args.model, host=args.host, port=args.port, quiet=args.quiet,
          transcoders=args.transcoders)  # fmt: skip
    return 0


def _cmd_transcoders(args: argparse.Namespace) -> int:
    """``attrlab transcoders zoo:TASK``: checked before the model loads."""
    zoo = _zoo()
    task = args.model[4:] if args.model.startswith("zoo:") else None
    if zoo is None or task is None or task not in zoo.tasks():
        names = ", ".join(f"zoo:{t}" for t in zoo.tasks()) if zoo is not None else "none"
        raise InputError(
            f"transcoders trains on a zoo model's task texts: give one of {names}, got "
            f"{args.model!r} (other models: al.dictionaries.train_transcoders(lm, texts))"
        )
    if args.k is not None and args.kind != "topk":
        raise InputError(f"--k is for --kind topk (got --kind {args.kind})")
    out = Path(args.out or f"transcoders-{task}").expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; give a directory")
    check_output(str(out / "summary.json"), "--out")
    import torch

    from . import dictionaries

    lm = zoo.load(task)
    _status(args, f"training {lm.cfg.n_layers} {args.kind} transcoders on zoo:{task} "
                  f"(width {args.width}, {args.steps} steps each)")  # fmt: skip
    options = {"k": args.k} if args.k is not None else {}
    ds = dictionaries.train_transcoders(lm, kind=args.kind, width=args.width, steps=args.steps,
                                       seed=args.seed, progress=not args.quiet, **options)  # fmt: skip
    dtype = torch.float16 if args.dtype == "float16" else None
    info = {"command": "attrlab transcoders " + " ".join(
        [args.model, f"--width {args.width}", f"--kind {args.kind}", f"--steps {args.steps}",
         f"--seed {args.seed}", f"--dtype {args.dtype}"] + ([f"--k {args.k}"] if args.k else [])),
        "kind": args.kind, "width": args.width, "steps": args.steps, "seed": args.seed}  # fmt: skip
    texts = dictionaries.heldout_texts(task)
    summary = dictionaries.write_transcoder_set(lm, ds, out, texts, dtype=dtype, info=info)
    print(f"{'layer':>5} {'FVE':>7} {'L0':>7} {'KL':>8} {'train s':>8}")
    for row in summary["layers"]:
        print(f"{row['layer']:>5} {row['fve']:>7.4f} {row['l0']:>7.1f} {row['kl']:>8.5f} "
              f"{row['train_seconds'] or 0:>8.1f}")  # fmt: skip
    mb = summary["bytes"] / 1e6
    print(f"wrote {out} ({mb:.2f} MB; FVE, L0, KL on {len(texts)} held-out texts)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .app.demo import SECTIONS, run_demo

    unknown = sorted(set(args.only or ()) - set(SECTIONS))
    if unknown:
        raise InputError(
            f"--only: unknown demo section(s) {', '.join(unknown)}; "
            f"choose from {', '.join(SECTIONS)}"
        )
    if args.prompt is not None and not args.prompt:
        raise EmptyPromptError("--prompt is empty: give the text to explain, or leave it out")
    _check_outputs(args, [("--out", "attrlab-report.html")])
    t0 = time.perf_counter()
    report, lines = run_demo(
        prompt=args.prompt,
        counterfactual=args.counterfactual,
        answer=args.answer,
        tiny=args.tiny,
        progress=not args.quiet,
        debug=args.debug,
        only=args.only,
    )
    print("\n".join(lines))
    rc = _write_outputs(args, None, lambda: report, flags=[("--out", ".html")])
    if rc == 0:
        print(f"report: {Path(args.out).resolve()}  ({time.perf_counter() - t0:.1f} s)")
    return rc


# ------------------------------------------------------------------ entry point


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _silence_loaders() -> None:
    """No weight-loading bars or info messages from transformers / the hub."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - transformers is a hard dependency
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attrlab`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return int(e.code or 0)
    func: Callable[[argparse.Namespace], int] = args.func
    # progress goes to a terminal only: piped or captured stderr gets just the errors
    args.quiet = bool(args.quiet) or not _isatty(sys.stderr)
    if args.quiet:
        _silence_loaders()
    try:
        return int(func(args))
    except (AttrlabError, OSError) as e:
        if args.debug:
            raise
        print(f"attrlab: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        print("attrlab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in attrlab or a library: still no traceback by default
        if args.debug:
            raise
        print(
            f"attrlab: internal error: {type(e).__name__}: {_message(e)}\n"
            "This is a bug; rerun with --debug for the traceback and report it.",
            file=sys.stderr,
        )
        return 1


def _message(e: BaseException) -> str:
    """The whole message of an error (every line: a token listing is what makes a
    length error actionable), or its type name when it has none; control and
    bidirectional characters shown as escapes."""
    return visible(str(e).strip()) or type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
