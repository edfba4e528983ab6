"""The question a result answers: its inputs, target, units and counterfactual.

:func:`attrlab.attribute` records the question in ``result.meta["question"]``
(JSON, so it is saved with the result). Evaluation functions read it back with
:func:`bind`: the prompt and target arguments become optional, and a prompt,
target or unit kind that differs from the result's raises
:class:`~attrlab.errors.QuestionMismatchError` before any forward pass. The
same place refuses a result whose scores are NaN or infinite
(:class:`~attrlab.errors.NonFiniteError`): such scores cannot be ranked.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "a b c", target=" a", method="occlusion")
    >>> r.meta["question"]["inputs"], r.meta["question"]["target"]
    ('a b c', {'kind': 'token', 'value': ' a'})
    >>> try:
    ...     al.evaluate.deletion_curve(lm, r, "a b d", " a")
    ... except al.errors.QuestionMismatchError as e:
    ...     print(type(e).__name__)
    QuestionMismatchError
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import AttrlabError, InputError, NonFiniteError, QuestionMismatchError

__all__ = ["Question", "bind", "check_scores", "record"]


# ------------------------------------------------------------------ recording
def _inputs_json(x: Any) -> Any:
    """Inputs as JSON: text as is, token ids as lists, a Batch as its real ids."""
    if isinstance(x, str) or x is None:
        return x
    if isinstance(x, Tensor):
        return x.detach().cpu().tolist()
    ids = getattr(x, "input_ids", None)
    mask = getattr(x, "attention_mask", None)
    if isinstance(ids, Tensor) and isinstance(mask, Tensor):
        return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
    if isinstance(x, (list, tuple)):
        return [_inputs_json(v) for v in x]
    if isinstance(x, (int, float, bool)):
        return x
    raise TypeError(type(x).__name__)


def _target_json(target: Any) -> dict[str, Any]:
    """A JSON spec of a target, rebuilt by :func:`_target_from_json` (``opaque``: not
    rebuildable, e.g. a callable)."""
    from . import targets as T

    if target is None or type(target) is T.TopToken:
        return {"kind": "default"}
    if isinstance(target, bool):
        return {"kind": "opaque", "description": repr(target)}
    if isinstance(target, (str, int)):
        return {"kind": "token", "value": target}
    if isinstance(target, tuple) and len(target) == 2:
        return {"kind": "pair", "value": _inputs_json(list(target))}
    if isinstance(target, (list, Tensor)):
        try:
            return {"kind": "tokens", "value": _inputs_json(target)}
        except TypeError:
            pass
    if type(target) in (T.Logit, T.LogProb, T.Prob):
        return {"kind": type(target).__name__, "token": _inputs_json(target.token)}
    if type(target) is T.LogitDiff:
        return {
            "kind": "LogitDiff",
            "a": _inputs_json(target.a.token),
            "b": _inputs_json(target.b.token),
        }
    if type(target) is T.ContinuationLogProb:
        return {
            "kind": "ContinuationLogProb",
            "continuation": _inputs_json(target.continuation),
            "reduce": target.reduce,
        }
    if type(target) is T.KL and target.reference is None:
        return {"kind": "KL"}
    desc = target.describe() if isinstance(target, T.Target) else T.FnTarget(target).describe()
    return {"kind": "opaque", "description": desc}


def _target_from_json(spec: Mapping[str, Any]) -> Any:
    from . import targets as T

    kind = spec.get("kind")
    if kind == "default":
        return None
    if kind in ("token", "tokens"):
        return spec["value"]
    if kind == "pair":
        return tuple(spec["value"])
    if kind in ("Logit", "LogProb", "Prob"):
        tok = spec["token"]
        return getattr(T, kind)(tok)
    if kind == "LogitDiff":
        return T.LogitDiff(spec["a"], spec["b"])
    if kind == "ContinuationLogProb":
        return T.ContinuationLogProb(spec["continuation"], reduce=spec["reduce"])
    if kind == "KL":
        return T.KL()
    raise InputError(
        f"the result's target {spec.get('description', kind)!r} cannot be rebuilt from the "
        "result (a callable or a target with tensors); pass the same target= again"
    )


def record(
    inputs: Any,
    target: Any,
    units: Any,
    counterfactual: Any,
    target_kind: str = "lm",
    ablation: Any = None,
) -> dict[str, Any] | None:
    """The JSON description of a question, as :func:`attrlab.attribute` stores it in
    ``result.meta["question"]`` (None if the inputs cannot be written as JSON).

    Example:
        >>> record("a b", (" a", " b"), None, None)["target"]
        {'kind': 'pair', 'value': [' a', ' b']}
    """
    try:
        q: dict[str, Any] = {
            "inputs": _inputs_json(inputs),
            "counterfactual": _inputs_json(counterfactual),
        }
    except TypeError:
        return None
    if isinstance(inputs, tuple):
        q["inputs_tuple"] = True
    q["target"] = _target_json(target)
    q["target_kind"] = target_kind
    if ablation is not None:
        from .ablations import Counterfactual, to_json

        try:  # a counterfactual is already recorded above
            q["ablation"] = (
                {"name": "counterfactual"}
                if isinstance(ablation, Counterfactual)
                else to_json(ablation)
            )
        except TypeError:
            return None
    if units is not None:
        q["units"] = {"kind": units.kind, "params": units.params()}
    return q


# ------------------------------------------------------------------- checking
def check_scores(result: Any, prefix: str = "cannot evaluate this result") -> None:
    """Raise :class:`NonFiniteError` if ``result.scores`` has a NaN or infinite entry.

    Example:
        >>> import torch
        >>> from attrlab.result import Attribution
        >>> r = Attribution(torch.tensor([1.0, float("nan")]), {"i": [0, 1]}, "tokens", "x")
        >>> try:
        ...     check_scores(r)
        ... except NonFiniteError as e:
        ...     print(str(e).split(":")[0])
        cannot evaluate this result
    """
    s = torch.as_tensor(result.scores)
    if not s.is_floating_point():
        return
    ok = torch.isfinite(s)
    if bool(ok.all()):
        return
    n_bad = int((~ok).sum())
    raise NonFiniteError(
        f"{prefix}: {n_bad} of {s.numel()} scores of {result.method!r} are NaN or infinite, "
        "and they have no rank. Recompute the attribution with finite inputs (baseline, "
        "target, options, model weights)"
    )


def _short(x: Any, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def _token_rows(lm: Any, x: Any) -> list[list[int]]:
    b = lm.tokenize(x)
    ids, mask = b.input_ids.cpu(), b.attention_mask.cpu()
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def _same_inputs(lm: Any, given: Any, recorded: Any) -> bool:
    try:
        if _inputs_json(given) == recorded:
            return True
    except TypeError:
        pass
    if lm is None or not hasattr(lm, "tokenize"):
        return False
    try:
        return _token_rows(lm, given) == _token_rows(lm, recorded)
    except (AttrlabError, TypeError, ValueError):
        return False


def _target_key(lm: Any, target: Any, inputs: Any) -> Any:
    """A comparable key of an ``lm`` target bound to ``lm`` (ids, not spellings)."""
    from . import targets as T

    t = T.resolve(target, lm)
    if isinstance(t, T.TopToken):
        t.prepare(lm, lm.tokenize(inputs))
    if isinstance(t, T.LogitDiff):
        return ("LogitDiff", _ids_key(t.a.ids), _ids_key(t.b.ids))
    if isinstance(t, (T.Logit, T.LogProb, T.Prob)):
        name = "Logit" if isinstance(t, T.TopToken) else type(t).__name__
        return (name, _ids_key(t.ids))
    if isinstance(t, T.ContinuationLogProb):
        return ("ContinuationLogProb", tuple(t.ids or ()), t.reduce)
    return (type(t).__name__, t.describe())


def _ids_key(ids: Any) -> Any:
    if isinstance(ids, Tensor):
        ids = ids.reshape(-1).tolist()
        return tuple(ids) if len(ids) != 1 else ids[0]
    return ids


def _response_matches(result: Any, given: Any) -> bool:
    from .targets import ContinuationLogProb

    meta = result.meta
    if isinstance(given, ContinuationLogProb):
        given = given.continuation
    if isinstance(given, Tensor):
        given = given.reshape(-1).tolist()
    if isinstance(given, str):
        return given == meta.get("response")
    if isinstance(given, (list, tuple)):
        return [int(t) for t in given] == list(meta.get("response_ids", []))
    return False


def _same_target(lm: Any, result: Any, given: Any, recorded: Any, inputs: Any, kind: str) -> bool:
    if _target_json(given) == _target_json(recorded):
        return True
    if kind == "raw":  # sources: the target is the response
        return "response_ids" in result.meta and _response_matches(result, given)
    try:
        return bool(_target_key(lm, given, inputs) == _target_key(lm, recorded, inputs))
    except (AttrlabError, TypeError, ValueError, KeyError, IndexError):
        return False


@dataclass
class Question:
    """The inputs, target, counterfactual and ablation an evaluation should use
    (see :func:`bind`).

    Example:
        >>> Question("a b", " a", None).inputs
        'a b'
    """

    inputs: Any
    target: Any
    counterfactual: Any
    #: the recorded :mod:`attrlab.ablations` object (None: the unit kind's default)
    ablation: Any = None
    #: ``"lm"`` (a target on the model's logits) or ``"raw"`` (sources: the response)
    target_kind: str = "lm"
    #: why the recorded ablation cannot be rebuilt (a tensor baseline), if so
    ablation_error: str | None = None

    def resolved_ablation(
        self, given: Any = None, reference: Any = None, counterfactual: Any = None
    ) -> Any:
        """The ablation to evaluate with: ``given`` (or the ``counterfactual=``
        shorthand) if any, else the recorded one (a recorded counterfactual prompt
        means ``Counterfactual``); None means the unit kind's default.

        Raises:
            InputError: ``reference=`` without ``"mean"`` / ``"resample"``, or a
                recorded ablation that cannot be rebuilt (pass ``ablation=`` again).

        Example:
            >>> Question("a b", " a", "a c").resolved_ablation()
            Counterfactual(inputs='a c')
            >>> Question("a b", " a", None).resolved_ablation("mean", reference=["c d"])
            Mean(reference=['c d'])
        """
        from .ablations import resolve

        if given is not None or counterfactual is not None:
            return resolve(given, counterfactual=counterfactual, reference=reference)
        if reference is not None:
            raise InputError(
                "reference= goes with ablation='mean' or 'resample'; pass ablation= too"
            )
        if self.ablation_error is not None:
            raise InputError(self.ablation_error)
        if self.ablation is not None:
            return self.ablation
        return resolve(None, counterfactual=self.counterfactual)


def bind(
    lm: Any,
    result: Any,
    inputs: Any = None,
    target: Any = None,
    counterfactual: Any = None,
    units: Any = None,
    what: str = "evaluate this result",
) -> Question:
    """The question ``result`` answers, with the given arguments checked against it.

    Missing ``inputs``, ``target`` and ``counterfactual`` are read from the
    result; given ones must match it (same tokens; the same target after binding
    to ``lm``, so ``" Mary"`` and its token id agree). Also refuses non-finite
    scores. Cheap: no forward pass unless a default (top-token) target is
    compared with an explicit one.

    Raises:
        QuestionMismatchError: another prompt, target, counterfactual or unit kind.
        NonFiniteError: the result has NaN or infinite scores.
        InputError: the result does not record what is missing; pass it.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c", target=" a", method="occlusion")
        >>> q = bind(lm, r)
        >>> q.inputs, q.target
        ('a b c', ' a')
    """
    check_scores(result, f"cannot {what}")
    meta = getattr(result, "meta", {}) or {}
    q = meta.get("question")
    kind = result.unit_kind
    if units is not None:
        from .units.base import resolve as resolve_units

        u_kind = resolve_units(units).kind
        if u_kind != kind:
            raise QuestionMismatchError(
                f"units={u_kind!r} but the result scores {kind!r} units; leave units= out "
                "or pass the units the result was computed on"
            )
    if not isinstance(q, Mapping):
        return _bind_unrecorded(lm, result, inputs, target, counterfactual)
    rec_inputs = q.get("inputs")
    if q.get("inputs_tuple") and isinstance(rec_inputs, list):
        rec_inputs = tuple(rec_inputs)
    if inputs is None:
        inputs = rec_inputs
    elif not _same_inputs(lm, inputs, rec_inputs):
        raise QuestionMismatchError(
            f"this result explains the prompt {_short(rec_inputs)}, not {_short(inputs)}: "
            "an evaluation on another prompt measures a different question. Leave the "
            "prompt out (it is read from the result) or attribute the new prompt first"
        )
    spec = q.get("target") or {"kind": "default"}
    t_kind = q.get("target_kind", "lm")
    if target is None:
        if spec.get("kind") == "default" and t_kind == "raw" and "response_ids" in meta:
            target = list(meta["response_ids"])  # the response the sources result explains
        else:
            target = _target_from_json(spec)
    else:
        recorded = None if spec.get("kind") == "opaque" else _target_from_json(spec)
        if spec.get("kind") == "opaque":
            from . import targets as T

            t = target if isinstance(target, T.Target) else T.FnTarget(target)
            same = callable(target) and t.describe() == spec.get("description")
        elif spec.get("kind") == "default" and t_kind == "raw":
            same = _response_matches(result, target) or "response_ids" not in meta
        else:
            same = _same_target(lm, result, target, recorded, inputs, t_kind)
        if not same:
            raise QuestionMismatchError(
                f"this result explains the target {result.target or spec!r}, not "
                f"{_short(target)}; leave target= out (it is read from the result) or pass "
                "the same target"
            )
    rec_cf = q.get("counterfactual")
    if counterfactual is None:
        counterfactual = rec_cf
    elif rec_cf is not None and not _same_inputs(lm, counterfactual, rec_cf):
        raise QuestionMismatchError(
            f"this result was computed with the counterfactual {_short(rec_cf)}, not "
            f"{_short(counterfactual)}; leave counterfactual= out or pass the same one"
        )
    spec_a = q.get("ablation")
    if isinstance(spec_a, Mapping) and spec_a.get("name") == "counterfactual":
        spec_a = None  # the prompt is the recorded counterfactual
    abl, err = _ablation_from(spec_a)
    return Question(inputs, target, counterfactual, abl, t_kind, err)


def _ablation_from(spec: Any) -> tuple[Any, str | None]:
    """``(ablation, None)`` from a recorded JSON spec, or ``(None, why)`` when it
    cannot be rebuilt (the error is raised only if the ablation is needed)."""
    from .ablations import from_json

    if not isinstance(spec, Mapping):
        return None, None
    try:
        return from_json(spec), None
    except (InputError, TypeError) as e:
        return None, str(e)


def _bind_unrecorded(
    lm: Any, result: Any, inputs: Any, target: Any, counterfactual: Any
) -> Question:
    """Results made without :func:`attrlab.attribute` (a method called directly, an
    old file): check what the result's metadata allows."""
    from .ablations import Counterfactual

    meta = getattr(result, "meta", {}) or {}
    text = meta.get("prompt") if result.unit_kind != "sources" else meta.get("context")
    if inputs is None:
        if not isinstance(text, str):
            raise InputError(
                "this result does not record its prompt (it was not made by al.attribute); "
                "pass the prompt it explains"
            )
        inputs = text
    elif isinstance(text, str) and isinstance(inputs, str) and inputs != text:
        raise QuestionMismatchError(
            f"this result explains the prompt {_short(text)}, not {_short(inputs)}; "
            "leave the prompt out or attribute the new prompt first"
        )
    if target is None and result.unit_kind == "sources" and "response_ids" in meta:
        target = list(meta["response_ids"])
    abl, err = _ablation_from(meta.get("ablation"))  # as Bound.result records it
    if isinstance(abl, Counterfactual):
        if counterfactual is None:
            counterfactual = abl.inputs
        elif not _same_inputs(lm, counterfactual, _inputs_json(abl.inputs)):
            raise QuestionMismatchError(
                f"this result was computed with the counterfactual {_short(abl.inputs)}, not "
                f"{_short(counterfactual)}; leave counterfactual= out or pass the same one"
            )
        abl = None  # the counterfactual prompt above
    kind = "raw" if result.unit_kind == "sources" else "lm"
    return Question(inputs, target, counterfactual, abl, kind, err)
