"""One re-entrant lock per model: attrlab calls on one model take turns.

A run installs hooks on the model's modules (and gradient methods swap some
module forwards) for the length of one call; that state belongs to the model,
not to the call. So every public entry point that runs a model (``lm.run``,
``al.attribute``, ``al.logit_lens``, ``al.evaluate.*``, the classifier
wrappers' runs) holds the model's lock for the whole call: two threads using one
model take turns, and a call never sees another call's hooks. The lock is keyed
on the ``torch.nn.Module``, so two wrappers of one Hugging Face model share it;
it is re-entrant, so a call may make nested calls on the same model.

Calls on *different* models still run in parallel.

Example:
    >>> import attrlab as al
    >>> model, tok = al.testing.tiny_model("gpt2")
    >>> a, b = al.wrap(model, tok), al.wrap(model, tok)
    >>> a.lock is b.lock is model_lock(model)
    True
    >>> with a.lock:  # e.g. around your own forwards with hooks of your own
    ...     logits, _ = a.run("a b c")
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["model_lock", "lock_of", "holds_model_lock"]

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()

F = TypeVar("F", bound=Callable[..., Any])


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock of ``model`` (created on first use, dropped with the model).

    Hold it around your own code that installs hooks on, or runs, a model
    attrlab may be running in another thread.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> model_lock(m) is model_lock(m)
        True
    """
    with _GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def lock_of(obj: Any) -> threading.RLock | None:
    """The model lock of a wrapped model (``al.LM``, a classifier wrapper) or of an
    ``nn.Module``; None for anything else.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> lock_of(lm) is lm.lock, lock_of("not a model")
        (True, None)
    """
    if isinstance(obj, nn.Module):
        return model_lock(obj)
    model = getattr(obj, "model", None)
    if isinstance(model, nn.Module):
        return model_lock(model)
    return None


def holds_model_lock(fn: F) -> F:
    """Decorator: the call holds the lock of its model, found in the argument named
    ``lm`` (or ``model``), else the first positional argument.

    Calls whose model argument is not a model (e.g. None) run unlocked.

    Example:
        >>> import attrlab as al
        >>> @holds_model_lock
        ... def first_logit(lm, text):
        ...     return float(lm.run(text)[0][0, -1, 0])
        >>> isinstance(first_logit(al.wrap(*al.testing.tiny_model("gpt2")), "a b"), float)
        True
    """
    sig = inspect.signature(fn)
    names = list(sig.parameters)
    key = next((n for n in ("lm", "model") if n in names), names[0] if names else None)
    index = names.index(key) if key is not None else None

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if key is not None and key in kwargs:
            target = kwargs[key]
        elif index is not None and index < len(args):
            target = args[index]
        else:
            target = None
        lock = lock_of(target)
        if lock is None:
            return fn(*args, **kwargs)
        with lock:
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
