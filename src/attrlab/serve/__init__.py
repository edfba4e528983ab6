"""``attrlab serve``: a local web explorer for every kind of result, with live
causal checks (see ``docs/serve.md``).

One concept per module: :mod:`.app` (routes and error mapping),
:mod:`.security` (token, headers), :mod:`.store` (the results directory and the
JSON the page reads), :mod:`.live` (ablations and comparisons), :mod:`.jobs`
(new attributions in the background), :mod:`.export` (self-contained HTML
files). The page itself is static files in ``static/`` (plain ES modules, the
vendored Cytoscape.js).

Example:
    >>> import tempfile
    >>> from starlette.testclient import TestClient
    >>> client = TestClient(create_app(tempfile.mkdtemp(), token="secret"))
    >>> client.get("/").status_code, client.get("/?token=secret").status_code
    (403, 200)
"""

from __future__ import annotations

import socket
import sys
import warnings
from pathlib import Path
from typing import Any

from .app import create_app, require_serve_dependencies
from .security import is_loopback, new_token

__all__ = ["create_app", "free_port", "require_serve_dependencies", "serve", "transcoders_for"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it).

    Example:
        >>> 1024 <= free_port() <= 65535
        True
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def url_of(host: str, port: int, token: str) -> str:
    """The URL to open (the token included).

    Example:
        >>> url_of("127.0.0.1", 8000, "abc")
        'http://127.0.0.1:8000/?token=abc'
    """
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={token}"


def transcoders_for(path: str | Path | None, model: str | None) -> Any:
    """The transcoders the server uses for checks on attribution graphs: the
    list loaded from ``path`` now (:func:`attrlab.dictionaries.load`), else for a
    ``zoo:TASK`` model a loader of the bundled set (called when first needed),
    else None.

    Raises:
        InputError / FileFormatError: ``path`` holds no dictionaries.

    Example:
        >>> transcoders_for(None, "gpt2") is None, callable(transcoders_for(None, "zoo:ioi"))
        (True, True)
    """
    from .. import dictionaries

    if path is not None:
        loaded = dictionaries.load(Path(path).expanduser())
        return loaded if isinstance(loaded, list) else [loaded]
    if model and model.startswith("zoo:") and hasattr(dictionaries, "zoo_transcoders"):
        task = model[4:]
        return lambda: dictionaries.zoo_transcoders(task)
    return None


def serve(
    results_dir: str | Path = ".",
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    token: str | None = None,
    lm: Any = None,
    quiet: bool = False,
    transcoders: str | Path | None = None,
) -> None:
    """Start the explorer and block until interrupted (what ``attrlab serve`` runs).

    Args:
        results_dir: the results to show; new results are saved here.
        model: a model to load for live checks (``zoo:ioi``, a HF id or path).
        host: the interface to bind; loopback by default (anything else warns:
            the token is then the only protection, and it travels unencrypted).
        port: the port (default: a random free one).
        token: the secret (default: a new random one).
        lm: an already wrapped model (instead of ``model``).
        quiet: no uvicorn access log.
        transcoders: a folder of per-layer transcoders for live checks on
            attribution graphs (:func:`attrlab.dictionaries.load`); default for
            ``zoo:TASK`` models: the bundled set
            (:func:`attrlab.dictionaries.zoo_transcoders`), loaded when first needed.

    Example:
        >>> serve("results", model="zoo:ioi")  # doctest: +SKIP
        attrlab serve: http://127.0.0.1:50123/?token=...
    """
    require_serve_dependencies()
    import uvicorn

    if not is_loopback(host):
        warnings.warn(
            f"attrlab serve is binding to {host}: other machines can reach it. The token "
            "is the only protection and travels unencrypted; prefer the default 127.0.0.1 "
            "(with an SSH tunnel for remote use)",
            UserWarning,
            stacklevel=2,
        )
    if lm is None and model:
        from ..cli import load_model

        lm = load_model(model)
    tcs = transcoders_for(transcoders, model)
    port = port or free_port(host if is_loopback(host) else "0.0.0.0")
    token = token or new_token()
    app = create_app(results_dir, lm=lm, token=token, cookie=f"attrlab_token_{port}",
                     transcoders=tcs)  # fmt: skip
    print(f"attrlab serve: {url_of(host, port, token)}", flush=True)
    print(f"  results: {Path(results_dir).resolve()}" + (f"  model: {lm.name}" if lm else ""),
          file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=not quiet)
