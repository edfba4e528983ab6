"""Memory of forwards over long prompts (4k-32k tokens) with eager attention.

A prompt is prefilled in chunks through a key/value cache, so a forward holds
the cache (linear in the length) and one chunk's attention scores
(``chunk x length`` per head, also linear): :func:`attention_prefill_chunk`
picks the chunk from the memory budget, :func:`long_context_estimate` says what
a run will need, :func:`announce` prints it before a large run starts.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("llama"))
    >>> attention_prefill_chunk(lm, 100)
    1024
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from .budget import ANNOUNCE_BYTES, MemoryEstimateWarning, memory_budget

__all__ = ["attention_prefill_chunk", "long_context_estimate", "announce", "LONG_PROMPT"]

#: prompts longer than this many tokens get a pre-flight estimate
LONG_PROMPT = 4096


def _attn_query_bytes(lm: Any, n_keys: int) -> int:
    """Bytes one query position of an eager-attention forward over ``n_keys`` keys
    holds: the scores and weights of every head (a few copies) plus one layer's
    activations."""
    cfg = lm.cfg
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    return 4 * (3 * cfg.n_heads * n_keys + 8 * cfg.d_model + 3 * d_mlp)


def attention_prefill_chunk(
    lm: Any, n_tokens: int, budget: int | str | None = None, cap: int = 1024
) -> int:
    """Positions per forward of a chunked prefill of ``n_tokens`` tokens so that
    the eager attention of one chunk (every head, ``chunk x n_tokens``) fits a
    quarter of the memory budget: between 16 and ``cap``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> attention_prefill_chunk(lm, 100) == 1024
        True
        >>> attention_prefill_chunk(lm, 1_000_000, budget="64MB") < 1024
        True
    """
    b = memory_budget(budget, getattr(lm, "device", None))
    fit = (b // 4) // max(1, _attn_query_bytes(lm, n_tokens))
    return int(max(16, min(cap, fit)))


def _kv_bytes(lm: Any, n_tokens: int) -> int:
    cfg = lm.cfg
    kv = getattr(cfg, "n_kv_heads", None) or cfg.n_heads
    return 2 * cfg.n_layers * kv * cfg.d_head * n_tokens * 4


def long_context_estimate(
    lm: Any, n_tokens: int, n_queries: int, chunk: int, kv_copies: int = 1
) -> int:
    """Estimated peak bytes of a chunked forward over ``n_tokens`` tokens: the KV
    cache (``kv_copies`` of it: a prefix walk keeps the previous prompt's), one
    chunk's eager attention and the ``n_queries`` attention rows read.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> long_context_estimate(lm, 4000, 2, 512) < long_context_estimate(lm, 8000, 2, 512)
        True
    """
    cfg = lm.cfg
    rows = cfg.n_layers * cfg.n_heads * n_queries * n_tokens * 4
    return kv_copies * _kv_bytes(lm, n_tokens) + chunk * _attn_query_bytes(lm, n_tokens) + rows


def announce(lm: Any, what: str, est: int, progress: bool) -> None:
    """Print a pre-flight estimate of ``est`` bytes for ``what`` (stderr, with
    ``progress``); warn (:class:`~attrlab.model.budget.MemoryEstimateWarning`)
    above :data:`attrlab.model.budget.ANNOUNCE_BYTES`.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> announce(lm, "a run", 2**20, progress=False)  # silent: small, no progress
    """
    msg = f"attrlab: {what} will need about {est / 2**20:.1f} MiB"
    if est > ANNOUNCE_BYTES:
        warnings.warn(msg + "; lower memory_budget= or shorten the context", MemoryEstimateWarning,
                      stacklevel=3)  # fmt: skip
    elif progress:
        print(msg, file=sys.stderr)
