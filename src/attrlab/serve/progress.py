"""Per-step progress of a background job, read from the tqdm bars attrlab's
methods already create.

attrlab's long loops (masked runs, gradient chunks, ablation batches, graph
rows, …) each make a ``tqdm`` bar, disabled unless ``progress=True``.
:func:`capture_progress` makes every bar created *on the calling thread* while
it is active a live, silent one (``disable=False``, written to a null file,
refreshed every step) and calls ``callback(fraction, desc)`` on each refresh.
Bars on other threads are untouched. Nested bars refine their parent: with an
outer bar at ``n`` of ``N`` and an inner one at ``k`` of ``K``, the fraction is
``(n + k / K) / N``. The fraction reported never goes back: with several bars
in a row it is the largest fraction reached so far, and ``desc`` names the
innermost bar being run. Bars of one step (or an unknown length) are not
followed: they would jump from 0 to 1.

tqdm has no per-thread callback hook, so this patches three methods of
``tqdm.std.tqdm`` (``__init__``, ``refresh``, ``close``) while a capture is
active; the patches only act on the capturing thread and are undone on exit.

Example:
    >>> from tqdm.auto import tqdm
    >>> seen = []
    >>> with capture_progress(lambda f, desc: seen.append(f)):
    ...     for _ in tqdm(range(4), disable=True):
    ...         pass
    >>> seen[-1], seen == sorted(seen)
    (1.0, True)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["capture_progress"]

_lock = threading.Lock()
_active: dict[int, _Capture] = {}
_originals: dict[str, Any] = {}


class _Null:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


class _Capture:
    def __init__(self, callback: Callable[[float, str], None]):
        self.callback = callback
        self.stack: list[Any] = []  # open bars, outermost first
        self.best = 0.0

    def opened(self, bar: Any) -> None:
        total = getattr(bar, "total", None)
        if total is not None and total > 1:  # one step (or unknown): nothing to follow
            self.stack.append(bar)

    def report(self, bar: Any) -> None:
        frac, scale, desc = 0.0, 1.0, ""
        for b in self.stack:
            total = getattr(b, "total", None)
            if not total:
                continue
            frac += scale * max(0.0, min(1.0, float(b.n) / float(total)))
            scale /= float(total)
            desc = str(getattr(b, "desc", "") or desc)
        if not self.stack or frac <= self.best:
            return
        self.best = min(1.0, frac)
        self.callback(self.best, desc)

    def closed(self, bar: Any) -> None:
        if bar in self.stack:
            self.report(bar)
            self.stack.remove(bar)


def _install() -> None:
    from tqdm import std

    cls = std.tqdm
    init, refresh, close = cls.__init__, cls.refresh, cls.close
    # the raw class attributes (``__init__`` is a partialmethod), restored as they were
    _originals.update({k: cls.__dict__[k] for k in ("__init__", "refresh", "close")})

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        cap = _active.get(threading.get_ident())
        if cap is not None:
            kwargs.update(disable=False, file=_Null(), mininterval=0, miniters=1, delay=0)
            kwargs.pop("position", None)
        init(self, *args, **kwargs)
        if cap is not None:
            self._attrlab_capture = cap
            cap.opened(self)

    def refresh_(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = refresh(self, *args, **kwargs)
        cap = getattr(self, "_attrlab_capture", None)
        if cap is not None:
            cap.report(self)
        return out

    def close_(self: Any) -> Any:
        cap = getattr(self, "_attrlab_capture", None)
        out = close(self)
        if cap is not None:
            cap.closed(self)
        return out

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.refresh = refresh_  # type: ignore[method-assign]
    cls.close = close_  # type: ignore[method-assign]


def _uninstall() -> None:
    from tqdm import std

    for k in ("__init__", "refresh", "close"):
        setattr(std.tqdm, k, _originals.pop(k))


@contextmanager
def capture_progress(callback: Callable[[float, str], None]) -> Iterator[None]:
    """Report the progress of the tqdm bars created on this thread (see the
    module docs): ``callback(fraction in [0, 1], bar description)``.

    Example:
        >>> from tqdm.auto import tqdm
        >>> got = []
        >>> with capture_progress(lambda f, d: got.append((f, d))):
        ...     bar = tqdm(total=2, desc="rows", disable=True)
        ...     _ = bar.update(1), bar.update(1), bar.close()
        >>> got[-1]
        (1.0, 'rows')
    """
    me = threading.get_ident()
    with _lock:
        if me in _active:
            raise RuntimeError("capture_progress is already active on this thread")
        if not _active:
            _install()
        _active[me] = _Capture(callback)
    try:
        yield
    finally:
        with _lock:
            _active.pop(me, None)
            if not _active:
                _uninstall()
