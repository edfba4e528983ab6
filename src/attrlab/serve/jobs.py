"""New attributions from the page, run as background jobs.

:func:`parse_request` turns the page's form (JSON) into the arguments of
:func:`attrlab.attribute` (or :func:`attrlab.routes` / :func:`attrlab.logit_lens`)
and checks everything that can be checked before the model runs — the same
typed errors as the Python API (unknown method or units, a method that does
not run on those units, an unknown ablation, bad options), so the page shows
the library's own message. :class:`JobRunner` runs accepted requests one at a
time on a worker thread (the machine's cores go to one model run), reports
their state (``queued`` → ``running`` → ``done`` | ``error``) with the stage, the
elapsed time and the fraction done (read from the methods' own tqdm bars by
:mod:`attrlab.serve.progress`; 1 when done), and saves each result into the results directory in the usual
format (``.attr``; graphs as ``.json``), under ``runs/``.

Example:
    >>> req = parse_request({"prompt": "a b c", "method": "ig", "units": "tokens",
    ...                      "target": " a", "options": {"steps": 8}})
    >>> req.method, req.kwargs()["steps"]
    ('ig', 8)
"""

from __future__ import annotations

import re
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AttrlabError, EmptyPromptError, InputError

__all__ = ["Job", "JobRequest", "JobRunner", "parse_request"]

#: the most jobs kept (finished ones are forgotten oldest first)
MAX_JOBS = 200
#: the most progress samples a job keeps (for tests and the page's history)
MAX_LOG = 10_000
_FIELDS = {"prompt", "target", "contrast", "counterfactual", "units", "unit_options", "method",
           "ablation", "reference", "options", "name"}  # fmt: skip
_SPECIAL = ("routes", "logit-lens")


def _text(d: dict[str, Any], key: str, required: bool = False) -> str | None:
    v = d.get(key)
    if v is None or v == "":
        if required:
            raise InputError(f"{key} is required")
        return None
    if not isinstance(v, str):
        raise InputError(f"{key} must be text, got {type(v).__name__}")
    if len(v) > 20_000:
        raise InputError(f"{key} is too long ({len(v)} characters; at most 20000)")
    return v


def _object(d: dict[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key)
    if v is None or v == "":
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and k.isidentifier() for k in v):
        raise InputError(f'{key} must be an object of name: value options, e.g. {{"steps": 16}}')
    return dict(v)


@dataclass
class JobRequest:
    """A checked request for a new attribution (see :func:`parse_request`).

    Example:
        >>> JobRequest("a b", None, "tokens", "ig").kwargs()
        {}
    """

    prompt: str
    target: Any
    units: Any
    method: str
    counterfactual: str | None = None
    ablation: str | None = None
    reference: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments for :func:`attrlab.attribute` besides the model,
        prompt, target, units and method.

        Example:
            >>> JobRequest("a b", " a", "heads", "patch", counterfactual="a c").kwargs()
            {'counterfactual': 'a c'}
        """
        kw: dict[str, Any] = {}
        if self.counterfactual is not None:
            kw["counterfactual"] = self.counterfactual
        if self.ablation is not None:
            kw["ablation"] = self.ablation
        if self.reference is not None:
            kw["reference"] = self.reference
        return {**kw, **self.options}

    def file_name(self) -> str:
        """The file the result is saved as, under ``runs/`` (a safe name).

        Example:
            >>> JobRequest("a", None, "heads", "atp*", name="my run!").file_name()[:11]
            'runs/my-run'
        """
        base = (
            self.name or f"{self.method}-{self.units if isinstance(self.units, str) else 'units'}"
        )
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.")[:60] or "result"
        stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
        ext = ".json" if self.method == "routes" else ".attr"
        return f"runs/{base}-{stamp}{ext}"


def parse_request(body: Any) -> JobRequest:
    """Check the page's form and build a :class:`JobRequest`, before any model runs.

    Fields: ``prompt`` (required), ``method`` (required), ``units`` (default
    ``"tokens"``), ``unit_options`` (an object: ``al.units.<Kind>(**unit_options)``),
    ``target`` (one token) or ``contrast`` (two tokens: a logit difference),
    ``counterfactual``, ``ablation``, ``reference`` (a list of prompts),
    ``options`` (the method's options, an object), ``name`` (the file's name).
    ``method`` may also be ``"routes"`` or ``"logit-lens"``.

    Raises:
        InputError (and its subclasses: UnknownMethodError, UnknownUnitsError,
        EmptyPromptError, UnsupportedAblationError): the message to show.

    Example:
        >>> parse_request({"prompt": "a", "method": "nope", "units": "heads"})
        Traceback (most recent call last):
        ...
        attrlab.errors.UnknownMethodError: unknown method 'nope'...
    """
    if not isinstance(body, dict):
        raise InputError("send the form as a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r}; fields are {', '.join(sorted(_FIELDS))}")
    prompt = _text(body, "prompt")
    if not prompt:
        raise EmptyPromptError("the prompt is empty: give the text to explain")
    method = _text(body, "method", required=True) or ""
    target: Any = _text(body, "target")
    contrast = body.get("contrast")
    if contrast not in (None, "", []):
        if not (isinstance(contrast, list) and len(contrast) == 2
                and all(isinstance(c, str) and c for c in contrast)):  # fmt: skip
            raise InputError('contrast is two answers, e.g. [" Mary", " John"]')
        if target is not None:
            raise InputError("give target or contrast, not both")
        target = (contrast[0], contrast[1])
    reference = body.get("reference")
    if reference not in (None, "", []):
        if not (isinstance(reference, list) and all(isinstance(r, str) for r in reference)):
            raise InputError("reference is a list of prompts")
    else:
        reference = None
    req = JobRequest(
        prompt=prompt,
        target=target,
        units=_text(body, "units") or "tokens",
        method=method,
        counterfactual=_text(body, "counterfactual"),
        ablation=_text(body, "ablation"),
        reference=reference,
        options=_object(body, "options"),
        name=_text(body, "name"),
    )
    if method in _SPECIAL:
        allowed = {"routes": {"tau", "per_head", "positions", "chunk"},
                   "logit-lens": {"k", "positions"}}[method]  # fmt: skip
        bad = sorted(set(req.options) - allowed)
        if bad:
            raise InputError(f"{method} takes the options {', '.join(sorted(allowed))}; "
                             f"not {bad[0]!r}")  # fmt: skip
        if method == "routes" and (target is not None or req.counterfactual):
            raise InputError("routes explain the model's own prediction: no target or "
                             "counterfactual")  # fmt: skip
        return req
    from ..ablations import resolve as resolve_ablation
    from ..cli import build_units
    from ..methods.base import find_method
    from ..units.base import resolve as resolve_units

    req.units = build_units(req.units, _object(body, "unit_options"))
    unit_obj = resolve_units(req.units)
    find_method(method, unit_obj.kind)  # UnknownMethodError with the choices
    if req.ablation is not None:
        abl = resolve_ablation(req.ablation, counterfactual=req.counterfactual,
                               reference=req.reference)  # fmt: skip
        unit_obj.check_ablation(abl)
    return req


@dataclass
class Job:
    """One background attribution: its state, stage, timing, and saved result.

    Example:
        >>> Job("j1", "ig over tokens").public()["state"]
        'queued'
    """

    id: str
    title: str
    state: str = "queued"
    stage: str = "waiting for the model"
    started: float | None = None
    finished: float | None = None
    created: float = field(default_factory=time.time)
    result_id: str | None = None
    error: str | None = None
    error_type: str | None = None
    fraction: float = 0.0
    progress_log: list[float] = field(default_factory=list)

    def advance(self, fraction: float, desc: str = "") -> None:
        """Record progress (never backwards; at most :data:`MAX_LOG` entries logged).

        Example:
            >>> j = Job("j", "t"); j.advance(0.5, "rows"); j.advance(0.25)
            >>> j.fraction, j.stage, j.progress_log
            (0.5, 'computing: rows', [0.5])
        """
        if fraction <= self.fraction:
            return
        self.fraction = min(1.0, float(fraction))
        if desc:
            self.stage = f"computing: {desc}"
        if len(self.progress_log) < MAX_LOG:
            self.progress_log.append(self.fraction)

    def public(self) -> dict[str, Any]:
        """The job as JSON for the page (``elapsed_s`` counts while running).

        Example:
            >>> sorted(Job("j", "t").public())[:3]
            ['elapsed_s', 'error', 'error_type']
        """
        end = self.finished or time.time()
        return {
            "id": self.id, "title": self.title, "state": self.state, "stage": self.stage,
            "elapsed_s": round(end - self.started, 3) if self.started else 0.0,
            "result_id": self.result_id, "error": self.error, "error_type": self.error_type,
            "fraction": round(self.fraction, 4),
        }  # fmt: skip


class JobRunner:
    """Runs :class:`JobRequest` s one at a time on a worker thread and saves them.

    Args:
        root: the results directory (results go to ``root/runs/``).
        get_model: returns the loaded model (called on the worker thread).

    Example:
        >>> import tempfile, attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> runner = JobRunner(tempfile.mkdtemp(), lambda: lm)
        >>> job = runner.submit(parse_request({"prompt": "a b c", "method": "dla",
        ...                                    "units": "heads", "target": " a"}))
        >>> runner.wait(job.id, timeout=60).state
        'done'
    """

    def __init__(self, root: str | Path, get_model: Callable[[], Any]):
        self.root = Path(root)
        self.get_model = get_model
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._requests: dict[str, JobRequest] = {}
        self._cv = threading.Condition()
        self._queue: list[str] = []
        self._thread: threading.Thread | None = None

    def submit(self, req: JobRequest) -> Job:
        """Queue a request; returns its job at once."""
        units = req.units if isinstance(req.units, str) else type(req.units).__name__.lower()
        job = Job(uuid.uuid4().hex[:12], f"{req.method} over {units}")
        with self._cv:
            self.jobs[job.id] = job
            self._requests[job.id] = req
            self._queue.append(job.id)
            while len(self.jobs) > MAX_JOBS:
                old = next(iter(self.jobs))
                if self.jobs[old].state in ("queued", "running"):
                    break
                self.jobs.pop(old)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="attrlab-jobs",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            self._cv.notify_all()
        return job

    def get(self, job_id: str) -> Job:
        """The job of that id.

        Raises:
            InputError: no such job.
        """
        with self._cv:
            job = self.jobs.get(job_id)
        if job is None:
            raise InputError(f"no job {job_id!r}")
        return job

    def wait(self, job_id: str, timeout: float = 60.0) -> Job:
        """Block until the job has finished (or ``timeout`` seconds passed)."""
        end = time.time() + timeout
        with self._cv:
            while self.get(job_id).state in ("queued", "running") and time.time() < end:
                self._cv.wait(timeout=max(0.0, end - time.time()))
        return self.get(job_id)

    def _work(self) -> None:
        while True:
            with self._cv:
                if not self._queue:
                    return
                jid = self._queue.pop(0)
                job, req = self.jobs[jid], self._requests.pop(jid)
                job.state, job.started, job.stage = "running", time.time(), "loading the model"
            try:
                rid = self._run(job, req)
                with self._cv:
                    job.state, job.stage, job.result_id = "done", "saved", rid
                    job.advance(1.0)
            except AttrlabError as e:
                with self._cv:
                    job.state, job.error, job.error_type = "error", str(e), type(e).__name__
            except Exception as e:  # a bug: keep the server up, show what happened
                with self._cv:
                    job.state, job.error_type = "error", type(e).__name__
                    job.error = f"internal error: {type(e).__name__}: {e}"
                traceback.print_exc()
            finally:
                with self._cv:
                    job.finished = time.time()
                    self._cv.notify_all()

    def _run(self, job: Job, req: JobRequest) -> str:
        import attrlab as al

        lm = self.get_model()
        if lm is None:
            raise InputError("no model is loaded: start the server with --model NAME or zoo:TASK")
        from .progress import capture_progress

        job.stage = "computing"
        result: Any
        with capture_progress(job.advance):
            if req.method == "routes":
                result = al.routes(lm, req.prompt, **req.options)
                # the prompt's ids, so that live checks need not re-tokenize the tokens
                result.meta.setdefault("ids", lm.tokenize(req.prompt).input_ids[0].tolist())
            elif req.method == "logit-lens":
                result = al.logit_lens(lm, req.prompt, target=req.target, **req.options)
            else:
                result = al.attribute(lm, req.prompt, target=req.target, units=req.units,
                                      method=req.method, **req.kwargs())  # fmt: skip
        job.stage = "saving"
        rid = req.file_name()
        path = self.root / rid
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save(path)
        return rid
