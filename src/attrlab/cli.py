"""The ``attrlab`` command line: ``attrlab demo``, ``attrlab explain``, ``attrlab show``.

Exit codes: 0 ok, 2 bad input (one line on stderr; ``--debug`` for a traceback).

Example:
    >>> from attrlab.cli import main
    >>> main(["--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import AttrlabError


def _demo(args: argparse.Namespace) -> int:
    import attrlab as al

    lm = al.wrap(*al.testing.tiny_model("gpt2"), name="tiny-random-gpt2")
    prompt = "When Mary and John went to the store, John gave a drink to"
    logits, cache = lm.run(prompt, cache=["blocks.1.attn.head_out"])
    top = logits[0, -1].topk(5)
    print(f"model: {lm}")
    print(f"prompt: {prompt!r}")
    print("top next tokens:", [(lm.to_str_tokens([int(i)])[0], round(float(v), 3))
                               for v, i in zip(top.values, top.indices)])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attrlab", description="Explain why a model produced an output.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="explain an IOI prompt on the bundled model, offline")
    d.set_defaults(func=_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attrlab`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except AttrlabError as e:
        if args.debug:
            raise
        print(f"attrlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
