"""The explorer's ASGI application: the page, the JSON API, the error mapping.

Routes (every one behind the token, :class:`attrlab.serve.security.TokenGuard`):

=========================  ====================================================
``GET /``                  the single-page app (``static/index.html``)
``GET /static/...``        its scripts, styles and vendored libraries
``GET /api/info``          model, results directory, methods, unit kinds
``GET /api/results``       one summary per result file
``GET /api/results/{id}``  one result as JSON (scores, unit labels, meta); ``?max_edges=N``
                           caps a graph to its N strongest edges
``GET /api/compare``       ``?a=ID&b=ID&k=10``: two results side by side
``POST /api/ablate``       ``{"id", "select": [i, ...], "ablation"?, "row"?}``
``POST /api/check``        ``{"id", "op", "select", ...}``: ablate / patch / steer (below)
``GET /api/diff``          ``?a=ID&b=ID``: two results' difference (:func:`~attrlab.serve.live.diff`)
``POST /api/jobs``         a new attribution (fields: :func:`~attrlab.serve.jobs.parse_request`)
``GET /api/jobs/{id}``     a job's state
``GET /api/export``        ``?id=ID&view=NAME[&other=ID]``: a self-contained HTML file
=========================  ====================================================

``POST /api/check`` runs a live check on any result: ``op`` is ``"ablate"``
(default), ``"patch"`` (from ``counterfactual``, default the result's own) or
``"steer"`` (``steer_op`` ``"add"`` / ``"set"`` / ``"scale"``, ``value``;
attribution graphs only); ``select`` is unit indices for an attribution and
node ids for a graph (:func:`attrlab.serve.graph_checks.check_graph`; an
attribution graph needs the server's transcoders).

Errors are JSON ``{"error": <typed error's class>, "message": <its message>}``:
400 for bad input (every :class:`~attrlab.errors.InputError`), 404 for a result
or job that does not exist, 409 when a live check needs a model and none is
loaded, 422 for a file attrlab cannot read, 500 for a bug.

Example:
    >>> import tempfile
    >>> from starlette.testclient import TestClient
    >>> app = create_app(tempfile.mkdtemp(), token="t")
    >>> TestClient(app).get("/api/results?token=t").json()
    []
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

from ..errors import AttrlabError, FileFormatError, InputError, MissingDependencyError
from .security import TokenGuard, new_token

__all__ = ["STATIC", "create_app", "require_serve_dependencies"]

STATIC = Path(__file__).parent / "static"


def require_serve_dependencies() -> None:
    """Raise :class:`~attrlab.errors.MissingDependencyError` naming the extra to
    install when the web server's packages (Starlette, uvicorn) are missing.

    Example:
        >>> require_serve_dependencies()  # installed here: no error
    """
    missing = []
    for mod in ("starlette", "uvicorn"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise MissingDependencyError(
            f"attrlab serve needs {' and '.join(missing)}: pip install 'attrlab[serve]'"
        )


class _NoModel(AttrlabError):
    """A live check was asked for, but the server has no model."""


def _status(e: BaseException) -> int:
    if isinstance(e, _NoModel):
        return 409
    if isinstance(e, FileFormatError):
        return 404 if str(e).startswith("no result") else 422
    if isinstance(e, InputError) and str(e).startswith("no job"):
        return 404
    return 400


def create_app(
    results_dir: str | Path,
    lm: Any = None,
    token: str | None = None,
    cookie: str = "attrlab_token",
    transcoders: Any = None,
) -> Any:
    """The explorer as an ASGI application (Starlette), wrapped in the token guard.

    Args:
        results_dir: the directory whose ``.attr`` / ``.json`` results are shown
            and where new results are saved (created if missing).
        lm: a wrapped model for live checks and new attributions (optional).
        token: the secret every request must carry (default: a new random one;
            then the caller cannot know it: pass one to use the app).
        cookie: the name of the cookie that keeps the token.
        transcoders: the per-layer transcoders for checks on attribution
            graphs: a list of :class:`~attrlab.dictionaries.Dictionary`, or a
            callable returning one (called once, when first needed).

    Example:
        >>> import tempfile
        >>> from starlette.testclient import TestClient
        >>> app = create_app(tempfile.mkdtemp(), token="t")
        >>> TestClient(app).get("/api/info").status_code
        403
    """
    require_serve_dependencies()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from .jobs import JobRunner, parse_request
    from .store import ResultStore

    store = ResultStore(results_dir)
    runner = JobRunner(store.root, lambda: lm)
    token = token or new_token()
    loaded: dict[str, Any] = {}

    def get_transcoders() -> Any:
        if "tcs" not in loaded:
            loaded["tcs"] = transcoders() if callable(transcoders) else transcoders
        return loaded["tcs"]

    def error(e: BaseException) -> JSONResponse:
        return JSONResponse({"error": type(e).__name__, "message": str(e)}, status_code=_status(e))

    async def on_attrlab_error(request: Request, e: Exception) -> Response:
        return error(e)

    async def on_http_error(request: Request, e: Exception) -> Response:
        code = getattr(e, "status_code", 400)
        return JSONResponse({"error": "NotFound" if code == 404 else "HTTPError",
                             "message": f"{request.method} {request.url.path}: "
                                        f"{getattr(e, 'detail', '')}"},
                            status_code=code)  # fmt: skip

    async def on_other_error(request: Request, e: Exception) -> Response:
        traceback.print_exc()
        return JSONResponse({"error": type(e).__name__,
                             "message": f"internal error: {type(e).__name__}: {e}"},
                            status_code=500)  # fmt: skip

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > 1_000_000:
            raise InputError("the request body is too large (over 1 MB)")
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, RecursionError) as e:
            raise InputError(f"the request body is not JSON: {e}") from e
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object")
        return body

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    def info(request: Request) -> Response:
        from ..methods.base import all_methods
        from ..units.base import unit_kinds

        return JSONResponse({
            "model": getattr(lm, "name", None) if lm is not None else None,
            "results_dir": str(store.root),
            "methods": {**all_methods(), "routes": ["graph"], "logit-lens": ["layers"]},
            "unit_kinds": unit_kinds(),
            "ablations": ["zero", "mean", "resample", "noise", "pad", "mask", "remove"],
            "transcoders": transcoders is not None,
        })  # fmt: skip

    def results(request: Request) -> Response:
        return JSONResponse(store.list())

    def result(request: Request) -> Response:
        cap = request.query_params.get("max_edges")
        max_edges = _int(cap, "max_edges") if cap else None
        if max_edges is not None and max_edges < 1:
            raise InputError("max_edges is at least 1")
        return JSONResponse(store.json(request.path_params["rid"], max_edges=max_edges))

    def compare_view(request: Request) -> Response:
        from .live import compare

        q = request.query_params
        a, b = q.get("a"), q.get("b")
        if not a or not b:
            raise InputError("compare needs two results: ?a=ID&b=ID")
        k = _int(q.get("k", "10"), "k")
        return JSONResponse(compare(store.load(a), store.load(b), k=k))  # type: ignore[arg-type]

    async def ablate(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        from ..result import Attribution
        from .live import ablate_selection

        body = await body_of(request)
        unknown = sorted(set(body) - {"id", "select", "ablation", "row"})
        if unknown:
            raise InputError(f"unknown field {unknown[0]!r}; send id, select, ablation, row")
        if lm is None:
            raise _NoModel("no model is loaded: start the server with --model NAME or zoo:TASK "
                           "to run live checks")  # fmt: skip
        rid = body.get("id")
        if not isinstance(rid, str):
            raise InputError("id: the result to check (its file name) is required")
        r = await run_in_threadpool(store.load, rid)
        if not isinstance(r, Attribution):
            raise InputError("live checks run on attribution results (.attr), not on graphs")
        abl = body.get("ablation") or None
        if abl is not None and not isinstance(abl, str):
            raise InputError("ablation is a name: zero, mean, resample, noise, pad, mask, remove")
        row = body.get("row")
        if row is not None and (isinstance(row, bool) or not isinstance(row, int)):
            raise InputError("row is a whole number")
        t0 = time.perf_counter()
        out = await run_in_threadpool(ablate_selection, lm, r, body.get("select") or [], abl,
                                      None, row)  # fmt: skip
        out["server_ms"] = (time.perf_counter() - t0) * 1000
        return JSONResponse(out)

    async def check(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        from ..result import Attribution
        from .graph_checks import OPS, check_graph
        from .live import ablate_selection, patch_selection

        body = await body_of(request)
        fields = {"id", "op", "select", "ablation", "row", "counterfactual", "steer_op", "value"}
        unknown = sorted(set(body) - fields)
        if unknown:
            raise InputError(f"unknown field {unknown[0]!r}; send {', '.join(sorted(fields))}")
        if lm is None:
            raise _NoModel("no model is loaded: start the server with --model NAME or zoo:TASK "
                           "to run live checks")  # fmt: skip
        rid = body.get("id")
        if not isinstance(rid, str):
            raise InputError("id: the result to check (its file name) is required")
        op = body.get("op") or "ablate"
        if op not in OPS:
            raise InputError(f"op must be one of {', '.join(OPS)}, got {op!r}")
        cf = body.get("counterfactual") or None
        if cf is not None and (not isinstance(cf, str) or len(cf) > 20_000):
            raise InputError("counterfactual is a prompt (text, at most 20000 characters)")
        steer_op = body.get("steer_op") or "add"
        value = body.get("value", 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or abs(value) > 1e6:  # fmt: skip
            raise InputError("value is a finite number (at most 1e6 in size)")
        row = body.get("row")
        if row is not None and (isinstance(row, bool) or not isinstance(row, int)):
            raise InputError("row is a whole number")
        abl = body.get("ablation") or None
        if abl is not None and not isinstance(abl, str):
            raise InputError("ablation is a name: zero, mean, resample, noise, pad, mask, remove")
        r = await run_in_threadpool(store.load, rid)
        select = body.get("select") or []
        t0 = time.perf_counter()
        if isinstance(r, Attribution):
            if op == "steer":
                raise InputError("steering acts on dictionary features: open an attribution "
                                 "graph (attribution results can be ablated or patched)")  # fmt: skip
            if op == "patch":
                out = await run_in_threadpool(patch_selection, lm, r, select, cf, row)
            else:
                out = await run_in_threadpool(ablate_selection, lm, r, select, abl, None, row)
            out["op"] = op
        else:
            from .graph_checks import graph_kind

            tcs = None
            if graph_kind(r) == "attribution_graph":
                tcs = await run_in_threadpool(get_transcoders)
            out = await run_in_threadpool(check_graph, lm, r, select, tcs, op, cf, steer_op,
                                          float(value))  # fmt: skip
        out["server_ms"] = (time.perf_counter() - t0) * 1000
        return JSONResponse(out)

    def diff_view(request: Request) -> Response:
        from .live import diff

        q = request.query_params
        a, b = q.get("a"), q.get("b")
        if not a or not b:
            raise InputError("diff needs two results: ?a=ID&b=ID")
        return JSONResponse(diff(store.load(a), store.load(b)))  # type: ignore[arg-type]

    async def submit(request: Request) -> Response:
        body = await body_of(request)
        req = parse_request(body)
        if lm is None:
            raise _NoModel("no model is loaded: start the server with --model NAME or zoo:TASK "
                           "to run attributions")  # fmt: skip
        job = runner.submit(req)
        return JSONResponse(job.public(), status_code=202)

    def job_state(request: Request) -> Response:
        return JSONResponse(runner.get(request.path_params["jid"]).public())

    def jobs(request: Request) -> Response:
        return JSONResponse([j.public() for j in reversed(runner.jobs.values())])

    def export(request: Request) -> Response:
        from .export import VIEWS, export_html

        q = request.query_params
        rid = q.get("id")
        if not rid:
            raise InputError("export needs ?id=RESULT")
        view = q.get("view") or "auto"
        if view not in VIEWS:
            raise InputError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
        other = q.get("other")
        page = export_html(store.json(rid), view=view,
                           other=store.json(other) if other else None)  # fmt: skip
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in rid)[:80]
        return Response(page, media_type="text/html; charset=utf-8", headers={
            "content-disposition": f'attachment; filename="{name}.html"'})  # fmt: skip

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/info", info),
            Route("/api/results", results),
            Route("/api/results/{rid:path}", result),
            Route("/api/compare", compare_view),
            Route("/api/ablate", ablate, methods=["POST"]),
            Route("/api/check", check, methods=["POST"]),
            Route("/api/diff", diff_view),
            Route("/api/jobs", submit, methods=["POST"]),
            Route("/api/jobs", jobs),
            Route("/api/jobs/{jid}", job_state),
            Route("/api/export", export),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={
            AttrlabError: on_attrlab_error,
            HTTPException: on_http_error,
            Exception: on_other_error,
        },  # fmt: skip
    )
    app.state.store = store
    app.state.runner = runner
    app.state.lm = lm
    guarded = TokenGuard(app, token, cookie)
    guarded.state = app.state  # type: ignore[attr-defined]
    guarded.runner = runner  # type: ignore[attr-defined]
    return guarded


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{name} must be a whole number, got {text!r}") from None
