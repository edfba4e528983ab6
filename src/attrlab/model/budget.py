"""Memory budget: batch sizes that follow the memory a forward needs, not a fixed count.

Methods that batch many points, masks or patches per forward (IG and the other
gradient methods, occlusion/LIME/SHAP over tokens, activation patching, the
sources runner) pick their rows per forward with :func:`batch_size_for`: as
many rows as fit the budget by :func:`row_bytes` (an estimate from the model
config: layers, width, MLP width, heads, sequence length, the vocabulary for
the logits, the attention matrices, and a backward factor for gradient
methods), at most the method's usual batch size, at least 1.

The budget is, in this order: ``memory_budget=`` given to the method, the one
set with :func:`set_memory_budget`, the environment variable
``ATTRLAB_MEMORY_BUDGET`` (bytes, or ``"512MB"``, ``"2GB"``), else
:data:`DEFAULT_FRACTION` of the memory available now (device memory for a
CUDA model), capped at :data:`DEFAULT_CAP`. An explicit ``batch_size=`` always
wins. Results do not depend on the batch size (beyond float round-off).

Runs that cache activations (patching, AtP / AtP*, EAP and the other edge
methods, DLA, attribution graphs: every ``lm.run(cache=...)``) say beforehand
how much memory they will need (:func:`cache_bytes`: the cached tensors plus
the forward's working memory): a :class:`MemoryEstimateWarning` when the
estimate exceeds :data:`ANNOUNCE_BYTES`, and a line on stderr for every new
largest run of a method called with ``progress=True`` (:func:`announcing`).

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> batch_size_for(lm, 1024, cap=32, grad=True, memory_budget="64MB")
    1
    >>> batch_size_for(lm, 16, cap=32, grad=True, memory_budget="64MB")
    32
    >>> batch_size_for(lm, 1024, cap=32, batch_size=4)  # explicit wins
    4
"""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import InputError

__all__ = [
    "ANNOUNCE_BYTES",
    "MemoryEstimateWarning",
    "announcing",
    "cache_bytes",
    "forward_seconds",
    "preflight",
    "peak_rss_growth",
    "DEFAULT_CAP",
    "DEFAULT_FRACTION",
    "available_memory",
    "balanced_chunk",
    "batch_size_for",
    "efficient_rows",
    "example_grad_bytes",
    "grad_batch_size",
    "memory_budget",
    "parse_bytes",
    "row_bytes",
    "saved_tensor_bytes",
    "set_memory_budget",
    "token_layer_flops",
    "overhead_tokens",
]

#: share of the memory available now that one forward may use by default
DEFAULT_FRACTION = 0.25
#: the default budget never exceeds this (bytes)
DEFAULT_CAP = 2 * 2**30
#: activations kept per layer and position, in units of ``d_model`` (residual
#: copies, norms, q/k/v, attention output) and of ``d_mlp`` (MLP in/act/out)
_PER_LAYER_D_MODEL = 12
_PER_LAYER_D_MLP = 3
#: attention matrices per layer and head (scores, probabilities, mask/dropout copies)
_ATTN_MATRICES = 3
#: a backward holds the forward's saved tensors plus gradients of the same size
_BACKWARD_FACTOR = 2
#: layers whose gradients a backward holds at once (the expected need)
_GRAD_LAYERS_LIVE = 2

_UNITS = {"": 1, "b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}
_override: int | None = None


def parse_bytes(value: int | float | str) -> int:
    """A size in bytes from a number or a string such as ``"512MB"`` or ``"2 GB"``.

    Example:
        >>> parse_bytes("1.5 KB"), parse_bytes(2048)
        (1536, 2048)
    """
    if isinstance(value, bool):
        raise InputError(f"memory_budget must be a size in bytes or like '2GB', got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", value.lower())
        if m is None:
            raise InputError(f"memory_budget must be a size like '512MB' or '2GB', got {value!r}")
        n = float(m.group(1)) * _UNITS[m.group(2).replace("i", "")]
    else:
        raise InputError(f"memory_budget must be a size in bytes or like '2GB', got {value!r}")
    if not n > 0 or n != n or n == float("inf"):
        raise InputError(f"memory_budget must be a positive size, got {value!r}")
    return int(n)


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes available now: free device memory for a CUDA device, else the host's
    available RAM (``MemAvailable``; a 4 GB guess if the system does not say).

    Example:
        >>> available_memory() > 0
        True
    """
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def set_memory_budget(value: int | str | None) -> None:
    """Set the budget of every later call (bytes or ``"2GB"``); None restores the default.

    Example:
        >>> set_memory_budget("1GB"); memory_budget()
        1073741824
        >>> set_memory_budget(None)
    """
    global _override
    _override = None if value is None else parse_bytes(value)


def memory_budget(value: int | str | None = None, device: Any = None) -> int:
    """The budget in bytes: ``value`` if given, else the global or environment
    setting, else the default (a fraction of available memory, capped).

    Example:
        >>> memory_budget("256MB")
        268435456
        >>> 0 < memory_budget() <= DEFAULT_CAP
        True
    """
    return _resolve(value, device)


def _resolve(value: int | str | None, device: Any) -> int:
    if value is not None:
        return parse_bytes(value)
    if _override is not None:
        return _override
    env = os.environ.get("ATTRLAB_MEMORY_BUDGET")
    if env:
        return parse_bytes(env)
    return max(1, min(DEFAULT_CAP, int(DEFAULT_FRACTION * available_memory(device))))


def _shape(lm: Any) -> tuple[int, int, int, int, int, int]:
    """``(layers, d_model, d_mlp, heads, vocab, bytes per element)`` of a wrapped model."""
    cfg = getattr(lm, "cfg", None)
    model = getattr(lm, "model", None)
    hf = getattr(model, "config", None)

    def get(*names: str, default: int) -> int:
        for src in (cfg, hf):
            for n in names:
                v = getattr(src, n, None)
                if isinstance(v, int) and v > 0:
                    return v
        return default

    d_model = get("d_model", "hidden_size", "n_embd", default=768)
    dtype = getattr(lm, "dtype", torch.float32)
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    return (
        get("n_layers", "num_hidden_layers", "n_layer", default=12),
        d_model,
        get("d_mlp", "intermediate_size", "n_inner", default=4 * d_model),
        get("n_heads", "num_attention_heads", "n_head", default=12),
        get("d_vocab", "vocab_size", default=50_000),
        max(size, 4),  # softmax and log-probs are often upcast
    )


def row_bytes(
    lm: Any,
    seq_len: int,
    grad: bool = False,
    logit_positions: int | None = None,
    expected: bool = False,
) -> int:
    """Estimated bytes one batch row of a forward over ``seq_len`` positions needs.

    Without gradients one layer's activations are live at a time; with
    gradients every layer's are kept for the backward, times a backward factor.
    ``logit_positions``: positions unembedded (default all ``seq_len``).

    ``expected``: the expected peak instead, without the 2x margin batch sizing
    keeps: one layer's activations and the logits; with gradients every
    layer's saved activations plus the gradients of about
    :data:`_GRAD_LAYERS_LIVE` layers (a backward frees them as it goes down)
    and the logits with their gradient. The two agree on a 2-layer model; on a
    12-layer GPT-2 the expected need is within 15% of the measured peak of IG.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> row_bytes(lm, 1024, grad=True) > 100 * row_bytes(lm, 64, grad=True)
        True
        >>> row_bytes(lm, 64, grad=True, expected=True) == row_bytes(lm, 64, grad=True)
        True
    """
    layers, d_model, d_mlp, heads, vocab, size = _shape(lm)
    seq = max(1, int(seq_len))
    per_layer = seq * (_PER_LAYER_D_MODEL * d_model + _PER_LAYER_D_MLP * d_mlp)
    per_layer += _ATTN_MATRICES * heads * seq * seq
    logits = 2 * vocab * (seq if logit_positions is None else max(1, int(logit_positions)))
    if expected:
        live = layers + _GRAD_LAYERS_LIVE if grad else 1
        total = live * per_layer + (2 if grad else 1) * logits
    elif grad:
        total = _BACKWARD_FACTOR * (layers * per_layer + logits)
    else:
        total = 2 * per_layer + logits
    return int(total * size)


def batch_size_for(
    lm: Any,
    seq_len: int,
    cap: int | None,
    grad: bool = False,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    logit_positions: int | None = None,
    total: int | None = None,
    expected: bool = False,
) -> int:
    """Rows per forward: ``batch_size`` if given, else as many rows of
    :func:`row_bytes` as fit the budget, between 1 and ``cap`` (None: no cap).

    ``total``: the rows the caller will push through in all (IG's steps,
    SmoothGrad's samples). The choice is then the cost model of
    :func:`balanced_chunk`: the fewest forwards that fit the budget, of equal
    size — all ``total`` rows in one forward when they fit.

    ``expected``: fit the expected need of a row (:func:`row_bytes` with
    ``expected=True``) instead of its 2x margin; for callers that know their
    whole job (``total``), where the default budget (a quarter of the
    available memory, at most :data:`DEFAULT_CAP`) is margin enough.

    Raises:
        InputError: ``batch_size`` is not a positive integer.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> batch_size_for(lm, 2048, cap=32, grad=True, memory_budget="1GB") < 32
        True
        >>> batch_size_for(lm, 16, cap=None, grad=True, total=50)  # all 50 in one forward
        50
        >>> batch_size_for(lm, 16, cap=None, grad=True, total=50, memory_budget="12MB")
        25
    """
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        return batch_size
    budget = _resolve(memory_budget, getattr(lm, "device", None))
    per_row = max(1, row_bytes(lm, seq_len, grad, logit_positions, expected))
    fit = max(1, budget // per_row)
    if cap is not None:
        fit = max(1, min(int(cap), fit))
    return fit if total is None else balanced_chunk(total, fit)


def balanced_chunk(total: int, fit: int) -> int:
    """Rows per forward for ``total`` rows when at most ``fit`` fit in one:
    the fewest forwards (``ceil(total / fit)``), of equal size.

    The cost model behind it (:func:`forward_seconds`): a forward, and each
    backward through it, costs a fixed overhead (dispatch, per layer) plus its
    work, with a penalty for small matrix products; the work is the same
    however the rows are split, so the fewest forwards win, and equal chunks
    avoid a small last one (50 IG steps, at most 32 per forward: 2 x 25, not
    32 + 18).

    Example:
        >>> balanced_chunk(50, 32), balanced_chunk(50, 64), balanced_chunk(100, 1)
        (25, 50, 1)
    """
    total, fit = max(1, int(total)), max(1, int(fit))
    chunks = -(-total // fit)
    return -(-total // chunks)


#: a batch of per-example gradients holds each gradient about this many times
#: (the vmapped gradient, its float32 flat view or copy, the backward's buffers)
_GRAD_COPIES = 3


def example_grad_bytes(
    n_params: int, saved_bytes: int = 0, param_bytes: int = 4, copies: int = _GRAD_COPIES
) -> int:
    """Estimated bytes one example of a batch of per-example gradients needs:
    ``copies`` gradients of ``n_params`` parameters plus the activations its
    forward saves for the backward (``saved_bytes``, e.g. measured by
    :func:`saved_tensor_bytes`, twice for the backward).

    Example:
        >>> example_grad_bytes(1000) == 3 * 1000 * 4
        True
        >>> example_grad_bytes(1000, saved_bytes=500) > example_grad_bytes(1000)
        True
    """
    return int(copies * n_params * param_bytes + _BACKWARD_FACTOR * max(0, saved_bytes))


def grad_batch_size(
    per_example_bytes: int,
    n_examples: int,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    device: Any = None,
    cap: int | None = None,
) -> int:
    """Examples per batch of per-example gradients: ``batch_size`` if given, else
    as many as fit the memory budget (at :func:`example_grad_bytes` each), never
    more than ``n_examples`` (nor ``cap``), at least 1.

    Per-example gradients cost a fixed overhead per batch (one vmapped call, one
    projection matmul per parameter block) plus a cost per example, so the
    fewest batches that fit memory are the fastest: a small model scores all
    its queries in one batch, a large one gets few examples per batch.

    Raises:
        InputError: ``batch_size`` is not a positive integer.

    Example:
        >>> grad_batch_size(4 * 10_000, 360, memory_budget="1GB")  # a small MLP: one batch
        360
        >>> grad_batch_size(3 * 4 * 10**8, 360, memory_budget="8GB")  # 100M parameters
        7
        >>> grad_batch_size(4 * 10_000, 360, batch_size=100)  # a forced value wins
        100
    """
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        return batch_size
    budget = _resolve(memory_budget, device)
    fit = budget // max(1, int(per_example_bytes))
    most = max(1, int(n_examples)) if cap is None else max(1, min(int(n_examples), int(cap)))
    return int(max(1, min(most, fit)))


def saved_tensor_bytes(fn: Any, exclude: Sequence[torch.Tensor] = ()) -> tuple[Any, int]:
    """Run ``fn()`` (with autograd on) and return ``(its result, the bytes of the
    tensors its graph saves for the backward)``, not counting ``exclude`` (e.g.
    the parameters, which every example shares). A cheap measured probe of a
    forward's activation memory for models without a config.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
        >>> _, b = saved_tensor_bytes(lambda: net(torch.ones(1, 8)).sum(), exclude=list(net.parameters()))
        >>> 0 < b < 1024
        True
    """
    skip = {t.data_ptr() for t in exclude}
    seen: set[tuple[int, int]] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.data_ptr(), t.numel())
        if t.data_ptr() not in skip and key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


# ------------------------------------------------------- throughput cost model
#: fixed seconds of one block's forward on a tiny input (Python, hooks, kernel
#: launches) per device type; measured on the 12-layer GPT-2 of the benchmarks
#: (2 CPU threads: ~0.3 ms a block with attrlab's hooks)
BLOCK_OVERHEAD_S = {"cpu": 3e-4, "cuda": 1e-4}
#: matrix-multiply throughput (FLOP/s) per device type; on CPU per thread
#: (2 threads reached ~230 GFLOP/s in the patching profile)
MATMUL_FLOPS = {"cpu": 1.1e11, "cuda": 1.5e13}
#: a matrix product over ``M`` tokens runs at about ``M / (M + M_half)`` of
#: the peak; ``M_half`` tokens per device type (small products are slow)
GEMM_HALF_TOKENS = {"cpu": 16, "cuda": 256}
#: a forward is efficient when its fixed cost is at most 1/this of its work
EFFICIENT_FACTOR = 50


def token_layer_flops(lm: Any, seq_len: int = 1) -> int:
    """Forward FLOPs of one token through one block: the attention projections
    (``4 d_model^2``, fewer with grouped key/value heads), the MLP
    (``2 x d_model x d_mlp``; a gated MLP's third matrix is left out: a cost
    model, not an account) and the attention scores over ``seq_len`` keys, two
    FLOPs per multiply-add.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> token_layer_flops(lm) < token_layer_flops(lm, seq_len=1024)
        True
    """
    _, d_model, d_mlp, heads, _, _ = _shape(lm)
    cfg = getattr(lm, "cfg", None)
    d_head = getattr(cfg, "d_head", None) or d_model // max(1, heads)
    kv = getattr(cfg, "n_kv_heads", None) or heads
    attn = 2 * d_model * heads * d_head + 2 * d_model * kv * d_head
    mlp = 2 * d_model * d_mlp
    scores = 2 * heads * d_head * max(1, int(seq_len))
    return 2 * (attn + mlp + scores)


def _device_kind(lm: Any) -> str:
    dev = getattr(lm, "device", None)
    kind = getattr(dev, "type", None) or str(dev or "cpu").split(":")[0]
    return kind if kind in BLOCK_OVERHEAD_S else "cuda" if kind != "cpu" else "cpu"


def overhead_tokens(lm: Any, seq_len: int = 1) -> float:
    """The fixed cost of one block's forward, in tokens of that block's work:
    the per-call overhead (:data:`BLOCK_OVERHEAD_S` at :data:`MATMUL_FLOPS`)
    plus the matrix products' small-size loss (:data:`GEMM_HALF_TOKENS`).
    A batched run should put many more tokens than this in one forward; a
    narrow model needs more rows for that than a wide one.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> overhead_tokens(lm) > 100  # a tiny model: the overhead dominates
        True
    """
    kind = _device_kind(lm)
    flops = MATMUL_FLOPS[kind] * (max(1, torch.get_num_threads()) if kind == "cpu" else 1)
    work = BLOCK_OVERHEAD_S[kind] * flops / max(1, token_layer_flops(lm, seq_len))
    return float(work + GEMM_HALF_TOKENS[kind])


def efficient_rows(lm: Any, tokens_per_row: int) -> int:
    """Rows per forward at which batching stops paying: the forward's tokens
    reach :data:`EFFICIENT_FACTOR` x :func:`overhead_tokens`. The cost-model
    ``cap`` of :func:`batch_size_for` for runs with many rows (patching sweeps,
    masked runs); the memory budget may lower it further.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> efficient_rows(lm, 16) > efficient_rows(lm, 256) >= 1
        True
    """
    per_row = max(1, int(tokens_per_row))
    want = EFFICIENT_FACTOR * overhead_tokens(lm, per_row)
    return max(1, int(-(-want // per_row)))


def forward_seconds(
    lm: Any,
    tokens: int,
    cached: int = 0,
    forwards: int = 1,
    grad: bool = False,
    workers: int = 1,
) -> float:
    """Estimated seconds of ``forwards`` forwards running ``tokens`` new token
    positions in total (padding included), each position attending to about
    ``cached`` earlier ones: the same throughput model as :func:`overhead_tokens`
    (a fixed cost per block and forward, :func:`token_layer_flops` at
    :data:`MATMUL_FLOPS`, small products penalised by :data:`GEMM_HALF_TOKENS`),
    summed over the layers. ``workers`` > 1: the forwards split over that many
    threads running in parallel at one intra-op thread each (the per-forward
    costs are paid side by side; the arithmetic rate is the same). For choosing
    strategies and batch sizes: compare estimates, do not read them as times.

    Example:
        >>> import attrlab as al
        >>> wide = al.wrap(*al.testing.tiny_model("llama", hidden_size=768, intermediate_size=2048))
        >>> tiny = al.wrap(*al.testing.tiny_model("llama"))
        >>> # one forward of 8 x 100 tokens vs eight of 100: batching pays on a tiny model ...
        >>> forward_seconds(tiny, 800) < 0.5 * forward_seconds(tiny, 800, forwards=8)
        True
        >>> # ... and hardly on a wide one, where the arithmetic dominates
        >>> forward_seconds(wide, 800) > 0.8 * forward_seconds(wide, 800, forwards=8)
        True
    """
    layers = _shape(lm)[0]
    kind = _device_kind(lm)
    flops = MATMUL_FLOPS[kind] * (max(1, torch.get_num_threads()) if kind == "cpu" else 1)
    n = max(1, int(forwards))
    per_token = token_layer_flops(lm, max(1, int(cached))) * (3 if grad else 1)
    work = per_token * (max(0, int(tokens)) + n * GEMM_HALF_TOKENS[kind]) / flops
    return layers * (n * BLOCK_OVERHEAD_S[kind] / max(1, int(workers)) + work)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_growth(fn: Any, interval: float = 0.0005) -> tuple[Any, int | None]:
    """Run ``fn()`` and return ``(its result, the peak growth of the process's
    resident memory while it ran)``, sampled every ``interval`` seconds by a
    thread reading ``/proc/self/statm`` (None where there is no such file).
    Freed heap memory is first handed back to the system (glibc's
    ``malloc_trim``), so the growth is what ``fn`` allocates, not what the
    allocator had kept.

    Example:
        >>> out, grew = peak_rss_growth(lambda: torch.ones(2**24).sum())
        >>> grew is None or grew > 2**24  # 64 MB of ones, freed after
        True
    """
    import ctypes
    import threading

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    start = _rss_bytes()
    if start is None:
        return fn(), None
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = _rss_bytes() or 0
            peak[0] = max(peak[0], now)
            done.wait(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss_bytes() or 0)
    return out, peak[0] - start


# ------------------------------------------------------- pre-flight estimates
#: estimates of runs that cache activations above this many bytes are announced
ANNOUNCE_BYTES = 2**30


class MemoryEstimateWarning(UserWarning):
    """A run that caches activations is estimated to need more than
    :data:`ANNOUNCE_BYTES` (see :func:`cache_bytes`)."""


_announce = threading.local()


@contextmanager
def announcing(on: bool = True) -> Iterator[None]:
    """Inside the block (in this thread) every run that caches activations and
    needs more than any before it prints its estimate to stderr (``al.attribute``
    enters it for methods called with ``progress=True``).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> with announcing():
        ...     _ = lm.run("a b", cache=["blocks.0.resid_pre"])  # doctest: +SKIP
    """
    saved = getattr(_announce, "state", None)
    _announce.state = {"on": bool(on) or bool(saved and saved["on"]), "max": 0}
    try:
        yield
    finally:
        _announce.state = saved


def _site_width(lm: Any, site: str, seq_len: int) -> int:
    """Elements per batch row and position of the site ``site``."""
    layers, d_model, d_mlp, heads, vocab, _ = _shape(lm)
    cfg = getattr(lm, "cfg", None)
    d_head = getattr(cfg, "d_head", None) or d_model // max(1, heads)
    kv = getattr(cfg, "n_kv_heads", None) or heads
    kind = site.split(".", 2)[-1] if site.startswith("blocks.") else site
    if kind in ("attn.q_in", "attn.k_in", "attn.v_in", "attn.head_out"):
        return heads * d_model
    if kind in ("attn.q", "attn.z"):
        return heads * d_head
    if kind in ("attn.k", "attn.v"):
        return kv * d_head
    if kind == "attn.pattern":
        return heads * max(1, seq_len)
    if kind == "mlp.neurons":
        return d_mlp
    experts = int(getattr(cfg, "n_experts", 0) or 0)
    if kind == "mlp.router":
        return experts
    if kind == "mlp.experts":
        return (experts + int(getattr(cfg, "n_shared_experts", 0) or 0)) * d_model
    if kind == "final_norm.scale":
        return 1
    if kind == "unembed":
        return vocab
    return d_model


def cache_bytes(
    lm: Any,
    sites: Sequence[str],
    rows: int,
    seq_len: int,
    grad: bool = False,
    logit_positions: int | None = None,
    past: int = 0,
) -> int:
    """Estimated bytes of one ``lm.run`` over ``rows`` rows of ``seq_len``
    positions that caches ``sites``: the cached tensors (in the model's dtype)
    plus the forward's working memory (half of :func:`row_bytes` per row, which
    keeps a 2x margin for batch sizing; under ``grad`` the saved activations of
    the backward; ``logit_positions`` as in :func:`row_bytes`). ``past``: the
    positions of a key/value cache the run continues (attention patterns then
    span ``past + seq_len`` keys). Within 50% of the measured peak on the tiny
    models.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> one = cache_bytes(lm, ["blocks.0.attn.head_out"], rows=1, seq_len=10)
        >>> cache_bytes(lm, ["blocks.0.attn.head_out"], rows=8, seq_len=10) == 8 * one
        True
    """
    dtype = getattr(lm, "dtype", torch.float32)
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    seq = max(1, int(seq_len))
    keys = seq + max(0, int(past))  # positions an attention pattern spans
    cached = sum(_site_width(lm, s, keys) for s in sites) * seq * size
    # row_bytes sizes batches with a 2x margin (two layers' activations live
    # without grad, the backward factor with it); here the expected need, which
    # tests/test_budget.py checks against the measured peak
    return int(rows) * (cached + row_bytes(lm, seq, grad, logit_positions) // 2)


def _fmt(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def preflight(
    lm: Any,
    sites: Sequence[str],
    rows: int,
    seq_len: int,
    grad: bool = False,
    logit_positions: int | None = None,
    past: int = 0,
) -> int:
    """Estimate a run that caches ``sites`` (:func:`cache_bytes`) and announce it
    before it starts (``logit_positions``: 1 for a ``last_only`` run; ``past``:
    the positions of a key/value cache it continues): a
    :class:`MemoryEstimateWarning` above :data:`ANNOUNCE_BYTES`, a line on
    stderr inside :func:`announcing` when it is the largest so far. Returns the estimate. Called by ``lm.run`` itself.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> preflight(lm, ["blocks.0.resid_pre"], rows=1, seq_len=4) < ANNOUNCE_BYTES
        True
    """
    if not sites:
        return 0
    est = cache_bytes(lm, sites, rows, seq_len, grad, logit_positions, past)
    msg = (
        f"attrlab: a run caching {len(sites)} sites over {rows} x {seq_len} tokens "
        f"{f'after {past} cached ' if past else ''}"
        f"{'with gradients ' if grad else ''}will need about {_fmt(est)} "
        f"({_fmt(est // max(1, rows))} per row)"
    )
    state = getattr(_announce, "state", None)
    if est > ANNOUNCE_BYTES:
        warnings.warn(
            msg + "; lower batch_size= / memory_budget= or shorten the prompt if it does not fit",
            MemoryEstimateWarning,
            stacklevel=3,
        )
    elif state is not None and state["on"] and est > state["max"]:
        print(msg, file=sys.stderr)
    if state is not None:
        state["max"] = max(state["max"], est)
    return est
