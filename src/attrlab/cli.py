"""The ``attrlab`` command line: ``attrlab demo``, ``attrlab explain``, ``attrlab show``.

``explain`` calls :func:`attrlab.load` and :func:`attrlab.attribute` exactly as
the Python API would, so its scores equal the Python call's. Exit codes: 0 ok,
2 bad input (one line on stderr; ``--debug`` for a traceback).

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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import AttrlabError, InputError

# ------------------------------------------------------------------ parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``attrlab: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,explain,show}")

    d = sub.add_parser(
        "demo",
        help="explain an IOI prompt with every available method, offline; write an HTML report",
        description="Explain an indirect-object-identification prompt on the bundled zoo model "
        "(offline) with every method family available, print a summary and write a "
        "self-contained HTML report.",
    )
    _common(d)
    d.add_argument(
        "--out", default="attrlab-report.html", help="report path (default: %(default)s)"
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
        "--method 'atp*' --counterfactual '...' --out heads.attr --html heads.html",
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
    e.add_argument("--method", default="ig", help="method name (default: %(default)s)")
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
    e.add_argument("--out", help="save the result (.attr, safetensors + JSON)")
    e.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    e.add_argument("--html", help="write a self-contained HTML report")
    e.add_argument("--top", type=int, default=10, help="rows in the terminal table")
    e.set_defaults(func=_cmd_explain)

    s = sub.add_parser(
        "show",
        help="print a saved result; --html to render it",
        description="Print a saved .attr result as a table; --html writes a report.",
    )
    _common(s)
    s.add_argument("file", help="a .attr file written by Attribution.save or explain --out")
    s.add_argument("--top", type=int, default=15, help="rows in the table (default: %(default)s)")
    s.add_argument("--html", help="write a self-contained HTML report")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_cmd_show)
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
    if not p.exists():
        # a hub id: use the local cache first (works offline, no network round trips)
        try:
            return al.load(name, local_files_only=True)
        except AttrlabError:
            raise
        except (OSError, ValueError, KeyError):
            pass
    try:
        return al.load(name)
    except AttrlabError:
        raise
    except (OSError, ValueError, KeyError) as e:
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
    return lines


def _write_outputs(args: argparse.Namespace, r: Any, title: str, info: dict[str, Any]) -> None:
    if getattr(args, "out", None):
        path = r.save(args.out)
        _status(args, f"saved {path}")
    if getattr(args, "html", None):
        from .report import Report

        path = Report(title, info=info).add(r, k=max(args.top, 5)).save(args.html)
        _status(args, f"wrote {path}")


# ------------------------------------------------------------------ commands


def _cmd_explain(args: argparse.Namespace) -> int:
    import attrlab as al

    from .methods.base import find_method
    from .units.base import resolve

    options = dict(parse_option(o) for o in args.option)
    units = build_units(args.units, dict(parse_option(o) for o in args.unit_option))
    find_method(args.method, resolve(units).kind)  # fail before loading the model
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
    _write_outputs(args, r, f"attrlab explain: {args.method} over {args.units}", info)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .result import Attribution

    if not Path(args.file).exists():
        raise InputError(f"no such file: {args.file}")
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

        path = (
            Report(f"attrlab: {Path(args.file).name}", info=info).add(r, k=args.top).save(args.html)
        )
        _status(args, f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .viz.demo import run_demo

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
    path = report.save(args.out)
    print("\n".join(lines))
    print(f"report: {path.resolve()}  ({time.perf_counter() - t0:.1f} s)")
    return 0


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
    except (AttrlabError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"attrlab: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        print("attrlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
