"""Work in parallel threads at one intra-op thread each.

Small forwards (a prefix walk's rows) and per-row backwards run far below a
CPU's arithmetic rate at several intra-op threads: each operation hands work
to the threads and waits for the slowest, and on a busy machine that wait is
long. Running independent pieces side by side, each on one intra-op thread,
keeps the cores busy without those hand-offs. :func:`parallel` does that for
a list of tasks; the intra-op thread count is lowered to one for the process
while any such run is active and restored when the last one ends (several
runs on different models may overlap).

Example:
    >>> import torch
    >>> parallel([lambda: torch.get_num_threads(), lambda: torch.get_num_threads()])
    [1, 1]
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["has_module_hooks", "intra_op_threads", "parallel"]

T = TypeVar("T")

_GUARD = threading.Lock()
_active = 0  # parallel runs in progress
_saved = 0  # the intra-op thread count before the first of them


def intra_op_threads() -> int:
    """The process's intra-op thread count (as before any :func:`parallel` run
    that is lowering it now).

    Example:
        >>> intra_op_threads() == torch.get_num_threads()
        True
    """
    with _GUARD:
        return _saved if _active else torch.get_num_threads()


def has_module_hooks(model: nn.Module) -> bool:
    """Whether a forward of ``model`` would run hooks (its modules', global
    module hooks, or accelerate's offloading hooks). Such forwards carry state
    that is not meant to be shared across threads.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> has_module_hooks(m)
        False
        >>> h = m[0].register_forward_hook(lambda *a: None)
        >>> has_module_hooks(m)
        True
        >>> h.remove()
    """
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            return True
    return False


def parallel(tasks: Sequence[Callable[[], T]]) -> list[T]:
    """Run ``tasks`` in as many threads at one intra-op thread each; their
    results in order. The first task's exception (by order) is raised after
    all have ended; the thread count is restored in any case.

    Example:
        >>> parallel([lambda: 1, lambda: 2])
        [1, 2]
    """
    global _active, _saved
    with _GUARD:
        if _active == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _active += 1
    try:
        with ThreadPoolExecutor(max(1, len(tasks)), thread_name_prefix="attrlab") as pool:
            futures = [pool.submit(t) for t in tasks]
            results: list[Any] = []
            for f in futures:
                f.exception()  # wait for every task before raising
            for f in futures:
                results.append(f.result())
            return results
    finally:
        with _GUARD:
            _active -= 1
            if _active == 0:
                torch.set_num_threads(_saved)
