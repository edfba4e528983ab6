"""Many prompts that share prefixes, each followed by the same tail, run so that
shared work is done once: the engine under the sources unit kind (ContextCite,
occlusion, Shapley … over the parts of a context).

Rows are token lists (an ablated prompt each); every row is followed by the
same ``tail`` (the response without its last token) and a function reads the
logits of the tail's positions. Three strategies:

* ``"walk"``: one row per forward, rows in prefix-tree order, the KV cache of
  the previous row kept up to the longest common prefix: the fewest tokens,
  the smallest forwards. On a CPU with several intra-op threads the walk order
  is cut into that many contiguous chains (``plan.workers``) that run in
  parallel threads at one intra-op thread each: small forwards keep every core
  busy without the thread hand-offs inside each operation, which a busy
  machine makes slow (12-layer 768-wide Llama, 64 rows of ~230 tokens on 2
  cores at load ~7: 3.2x faster than one chain at 2 threads).
* ``"tree"``: the same prefix sharing, batched. Every row takes its cached
  prefix from the *earliest* row that shares it, so rows fall into waves (a
  row's wave is one more than its source's); the rows of a wave run together,
  length-sorted, each on its own left-padded cached prefix. The same tokens
  as ``"walk"`` (plus padding) in a few large forwards; the KV of rows that
  later rows read is kept meanwhile.
* ``"flat"``: the prefix common to all rows encoded once, then length-sorted
  batches: more tokens, fewest forwards (wins on small models, where a
  forward's fixed cost dominates).

``"auto"`` estimates each strategy's time with
:func:`attrlab.model.budget.forward_seconds` (fixed cost per forward, the
layers' arithmetic with a penalty for small matrix products, attention over
the cache) for these very rows, under the memory budget, and runs the
cheapest (a batched one when it is within :data:`BATCHED_MARGIN` of the walk:
the model knows no machine load, and large forwards suffer less from it).
Results equal plain forwards' up to float round-off in every strategy.

Example:
    >>> import attrlab as al, torch
    >>> lm = al.wrap(*al.testing.tiny_model("llama"))
    >>> rows = [[1, 5, 6, 7], [1, 5, 6, 8], [1, 5, 9]]
    >>> last = lambda logits, idx: logits[:, -1, :3]
    >>> runner = PrefixRunner(lm)
    >>> walk = torch.stack(runner.run(rows, [4, 2], last, strategy="walk"))
    >>> tree = torch.stack(runner.run(rows, [4, 2], last, strategy="tree"))
    >>> bool(torch.allclose(walk, tree, atol=1e-5))
    True
"""

from __future__ import annotations

import bisect
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..errors import ContextTooLongError, InputError
from .budget import _shape, batch_size_for, forward_seconds, memory_budget
from .threads import has_module_hooks, intra_op_threads, parallel

__all__ = ["STRATEGIES", "Plan", "PrefixRunner", "Rows", "lcp"]

#: how a :class:`PrefixRunner` may run its rows ("auto": the cheapest by the cost model)
STRATEGIES = ("auto", "walk", "tree", "flat")
#: at most this many rows per batched forward
MAX_ROWS = 64
#: a batched forward runs at least this many token positions when rows allow
MIN_BATCH_TOKENS = 2048
#: "auto" prefers a batched strategy whose estimate is within this share of the
#: single-chain walk's
BATCHED_MARGIN = 0.05
#: a parallel walk gives each chain at least this many rows
MIN_CHAIN_ROWS = 4


def lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists.

    Example:
        >>> lcp([1, 2, 3], [1, 2, 4, 5])
        2
    """
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _supports_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_of(data: list[tuple[Tensor, Tensor]] | None) -> Any:
    """A DynamicCache holding ``data`` (per layer ``(keys, values)``), empty for None."""
    from transformers import DynamicCache

    if not data:
        return DynamicCache()
    return DynamicCache(ddp_cache_data=data)


def _cache_from(kv: list[tuple[Tensor, Tensor]] | None, n: int, batch: int = 1) -> Any:
    """A fresh DynamicCache holding the first ``n`` positions of ``kv`` (``batch`` copies)."""
    if kv is None or n == 0:
        return _cache_of(None)
    data = []
    for k, v in kv:
        k, v = k[:, :, :n], v[:, :, :n]
        if batch != k.shape[0]:
            k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        data.append((k, v))
    return _cache_of(data)


def _kv_of(cache: Any) -> list[tuple[Tensor, Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))  # older transformers


class Rows:
    """Token rows known by their lengths, fetched (tokenized) a few at a time.

    ``lengths``: tokens per row; ``first``: the first row's tokens; ``common``:
    the length of the prefix every row shares. ``fetch(idx)`` materializes some
    rows; ``walk_order()`` is the order of the prefix-tree walk (rows that share
    a prefix next to each other). :meth:`of` wraps ready lists.

    Example:
        >>> r = Rows.of([[1, 2, 3], [1, 2], [1, 4]])
        >>> len(r), r.common, r.walk_order()
        (3, 1, [1, 0, 2])
    """

    def __init__(
        self,
        lengths: list[int],
        first: list[int],
        common: int,
        fetch: Callable[[list[int]], list[list[int]]],
        walk_order: Callable[[], list[int]],
        per_fetch: int = 32,
    ):
        self.lengths = lengths
        self.first = first
        self.common = common
        self.fetch = fetch
        self.walk_order = walk_order
        self.per_fetch = per_fetch

    @classmethod
    def of(cls, rows: Sequence[Sequence[int]]) -> Rows:
        lists = [list(r) for r in rows]
        common = min(len(r) for r in lists)
        for r in lists[1:]:
            common = min(common, lcp(lists[0], r))
        return cls(
            [len(r) for r in lists],
            lists[0],
            common,
            lambda idx: [lists[i] for i in idx],
            lambda: sorted(range(len(lists)), key=lambda i: lists[i]),
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def iterate(self, order: Sequence[int]) -> Any:
        """``(index, tokens)`` in ``order``, fetching ``per_fetch`` rows at a time."""
        for b0 in range(0, len(order), self.per_fetch):
            idx = list(order[b0 : b0 + self.per_fetch])
            yield from zip(idx, self.fetch(idx))


@dataclass
class Plan:
    """How a :class:`PrefixRunner` runs its rows: the chosen ``strategy``, the
    estimated seconds of every strategy it weighed (``estimates``), rows per
    batched forward (``rows``), and for ``"tree"`` the waves of batches.

    Example:
        >>> Plan("walk").strategy
        'walk'
    """

    strategy: str
    estimates: dict[str, float] = field(default_factory=dict)
    rows: int = 1
    order: list[int] = field(default_factory=list)  # walk order
    shared: list[int] = field(default_factory=list)  # per row: cached prefix length
    source: list[int] = field(default_factory=list)  # per row: row its prefix comes from (-1: root)
    batches: list[list[int]] = field(default_factory=list)  # tree: rows per forward, by wave
    keep: list[int] = field(default_factory=list)  # per row: prefix length later rows read
    root: int = 0  # tokens every row shares (encoded once)
    workers: int = 1  # walk: chains run in parallel threads (one intra-op thread each)


class PrefixRunner:
    """Runs ``rows`` (token lists) followed by a fixed tail and applies ``fn`` to
    the tail positions' logits, doing shared prefixes once (see the module).

    ``n_ctx``: the model's context (rows are checked against it before any
    forward); ``chunk``: at most this many positions per forward of one row
    (long prompts are prefilled in pieces; batched strategies need rows no longer).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> out = PrefixRunner(lm).run([[1, 2, 3], [1, 2]], [4], lambda lg, idx: lg[:, -1, :2])
        >>> [tuple(o.shape) for o in out]
        [(2,), (2,)]
    """

    def __init__(self, lm: Any, n_ctx: int | None = None, chunk: int = 1024):
        self.lm = lm
        self.n_ctx = n_ctx if n_ctx is not None else getattr(lm.cfg, "n_ctx", None)
        self.chunk = chunk
        self.keep_ok = _supports_logits_to_keep(lm.model)
        # the wrapper's input device: the first parameter may be offloaded ("meta")
        self.device = lm.device
        self.n_tokens = 0  # tokens run through the model (a cost measure)
        self.n_forwards = 0
        self.plan: Plan | None = None
        self._count = threading.Lock()  # the counters, from a parallel walk's threads
        self._lock_each = True  # False while a parallel walk holds the model's lock

    # ------------------------------------------------------------ forwards
    def _forward(
        self, ids: Tensor, pos: Tensor, cache: Any, keep: int, mask: Tensor | None = None
    ) -> Tensor:
        kw: dict[str, Any] = {}
        if self.keep_ok:
            kw["logits_to_keep"] = max(1, keep)
        if mask is not None:
            kw["attention_mask"] = mask.to(self.device)
        # a parallel walk's threads run while their caller holds the model's lock
        run = self.lm.hf_forward if self._lock_each else self.lm.hf_forward_held
        logits, _ = run(
            ids.to(self.device),
            position_ids=pos.to(self.device),
            kv_cache=cache,
            use_cache=True,
            **kw,
        )
        with self._count:
            self.n_tokens += int(ids.numel())
            self.n_forwards += 1
        return logits[:, logits.shape[1] - keep :] if keep > 0 else logits[:, :0]

    def _check_len(self, longest_row: int, n_tail: int) -> None:
        longest = longest_row + n_tail - 1
        if self.n_ctx is not None and longest > self.n_ctx:
            raise ContextTooLongError(
                f"a prompt with its response has {longest} tokens; this model's context is "
                f"{self.n_ctx}. Use fewer or shorter sources."
            )

    # ------------------------------------------------------------ planning
    def _walk_shares(self, rows: Rows, order: list[int]) -> list[int]:
        """Per row (by index): its common prefix with the row before it in ``order``."""
        shared = [0] * len(rows)
        prev: list[int] | None = None
        for i, row in rows.iterate(order):
            shared[i] = 0 if prev is None else lcp(prev, row)
            prev = row
        return shared

    def make_plan(
        self,
        rows: Rows,
        n_response: int,
        batch_size: int | str = "auto",
        strategy: str = "auto",
        reuse: bool = True,
    ) -> Plan:
        """Choose how to run ``rows`` (see the module): ``strategy`` forces one,
        ``batch_size`` caps the rows per batched forward (1: the walk).

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("llama"))
            >>> rows = Rows.of([[1, 2, 3, 4], [1, 2, 3, 5], [1, 6, 7]])
            >>> p = PrefixRunner(lm).make_plan(rows, 2)
            >>> p.strategy in ("walk", "tree", "flat"), sorted(p.estimates)
            (True, ['flat', 'tree', 'walk'])
        """
        if strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if batch_size != "auto" and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise InputError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
        m = len(rows)
        lengths = rows.lengths
        tail = n_response - 1
        longest = max(lengths) + n_response
        if not reuse:
            strategy = "walk" if batch_size == 1 else "flat"
        elif batch_size == 1 or (longest > self.chunk and strategy == "auto"):
            strategy = "walk"
        if strategy in ("tree", "flat") and longest > self.chunk:
            raise InputError(
                f"strategy={strategy!r} runs whole prompts per forward; these have up to "
                f"{longest} tokens (more than {self.chunk}): use strategy='walk'"
            )
        cap = MAX_ROWS if batch_size == "auto" else int(batch_size)
        rows_cap = batch_size_for(self.lm, longest, cap=cap, logit_positions=n_response)
        budget_tokens = self.tokens_per_forward()

        order = rows.walk_order() if reuse else list(range(m))
        plan = Plan("walk", order=order, rows=rows_cap)
        root = min(min(lengths) - 1, rows.common) if reuse else 0
        plan.root = max(0, root)
        est: dict[str, float] = {}
        if reuse:
            between = self._walk_shares(rows, order)
            shared = [min(between[i], lengths[i] - 1) for i in range(m)]
            shared[order[0]] = 0
            workers = self.parallel_workers(m)
            walked = list(shared)
            if workers > 1:
                chains = _chains(order, [lengths[i] - shared[i] + tail for i in range(m)], workers)
                for c in chains[1:]:  # a chain starts with no cache
                    walked[c[0]] = 0
            walk_tokens = sum(lengths[i] - walked[i] + tail for i in range(m))
            est["walk"] = forward_seconds(
                self.lm, walk_tokens, cached=longest // 2, forwards=m, workers=workers
            )
            plan.shared = shared
            plan.workers = workers
            if strategy in ("auto", "tree"):
                self._plan_tree(plan, rows, tail, rows_cap, budget_tokens, between)
                est["tree"] = plan.estimates.pop("tree")
        # flat: the common prefix once, then length-sorted batches
        by_len = sorted(range(m), key=lambda i: lengths[i])
        flat_tokens, flat_fw = plan.root, 1 if plan.root else 0
        b0 = 0
        while b0 < m:
            size = max(1, min(rows_cap, budget_tokens // max(1, lengths[by_len[b0]] + tail)))
            idx = by_len[b0 : b0 + size]
            flat_tokens += len(idx) * (max(lengths[i] for i in idx) - plan.root + tail)
            flat_fw += 1
            b0 += size
        est["flat"] = forward_seconds(self.lm, flat_tokens, cached=longest // 2, forwards=flat_fw)
        plan.estimates = est
        if strategy == "auto":
            strategy = min(est, key=est.__getitem__)
            # the model knows no machine load: a batched strategy within
            # BATCHED_MARGIN of the walk is taken, since fewer, larger forwards
            # lose less to a busy CPU (12-layer 768-wide Llama, 64 ablations:
            # tree 1.45x faster than the walk at load ~6 on 2 cores; on a quiet
            # machine the walk 8-15% faster, as the model predicts)
            if strategy == "walk" and plan.workers == 1:
                batched = min(("tree", "flat"), key=lambda k: est.get(k, float("inf")))
                if est.get(batched, float("inf")) <= (1 + BATCHED_MARGIN) * est["walk"]:
                    strategy = batched
        plan.strategy = strategy
        if strategy != "walk":
            plan.workers = 1
        return plan

    def parallel_workers(self, rows: int) -> int:
        """Chains a walk over ``rows`` rows runs in parallel: the process's intra-op
        threads on a CPU, when the model runs plain (no module hooks, no offloaded
        weights) and every chain gets :data:`MIN_CHAIN_ROWS` rows; else 1.

        Example:
            >>> import attrlab as al, torch
            >>> runner = PrefixRunner(al.wrap(*al.testing.tiny_model("llama")))
            >>> runner.parallel_workers(64) == min(torch.get_num_threads(), 16)  # no run active
            True
            >>> runner.parallel_workers(3)
            1
        """
        threads = intra_op_threads()
        if threads < 2 or rows < 2 * MIN_CHAIN_ROWS or self.device.type != "cpu":
            return 1
        if has_module_hooks(self.lm.model):
            return 1
        return max(1, min(threads, rows // MIN_CHAIN_ROWS))

    def _plan_tree(
        self,
        plan: Plan,
        rows: Rows,
        tail: int,
        rows_cap: int,
        budget_tokens: int,
        between: list[int],
    ) -> None:
        """Sources, waves and batches of the batched prefix-tree strategy, its
        estimated time (``plan.estimates["tree"]``; infinite when the KV it
        keeps would not fit the memory budget)."""
        order, shared, lengths = plan.order, plan.shared, rows.lengths
        m = len(order)
        source = [-1] * m
        wave = [0] * m
        # a row's prefix comes from the earliest row before it in walk order whose
        # shares with every row in between are at least as long (then it holds that
        # prefix); found on a stack of positions with increasing shares
        stack_pos: list[int] = []  # positions in `order`
        stack_val: list[int] = []  # their `between` values, increasing
        for j, i in enumerate(order):
            if j > 0:
                b = between[i]
                while stack_val and stack_val[-1] >= b:
                    stack_val.pop()
                    stack_pos.pop()
                stack_pos.append(j)
                stack_val.append(b)
            need = shared[i]
            if j == 0 or need <= plan.root:
                shared[i] = plan.root
                continue
            # the last position (<= j) whose share is below `need`: rows from there on
            # share at least `need` tokens with row i
            k = bisect.bisect_left(stack_val, need) - 1
            src_pos = stack_pos[k] if k >= 0 else 0
            src = order[src_pos]
            source[i] = src
            wave[i] = wave[src] + 1
        keep = [0] * m
        for i in range(m):
            if source[i] >= 0:
                keep[source[i]] = max(keep[source[i]], shared[i])
        # batches: per wave, rows sorted by new tokens, cut by the token budget
        waves: dict[int, list[int]] = {}
        for i in range(m):
            waves.setdefault(wave[i], []).append(i)
        batches: list[list[int]] = []
        tokens, forwards = plan.root, 1 if plan.root else 0
        cached_sum = 0
        for w in sorted(waves):
            members = sorted(waves[w], key=lambda i: lengths[i] - shared[i])
            b0 = 0
            while b0 < len(members):
                batch = [members[b0]]
                width = lengths[members[b0]] - shared[members[b0]] + tail
                while b0 + len(batch) < len(members) and len(batch) < rows_cap:
                    nxt = members[b0 + len(batch)]
                    w_new = max(width, lengths[nxt] - shared[nxt] + tail)
                    if (len(batch) + 1) * w_new > budget_tokens:
                        break
                    batch.append(nxt)
                    width = w_new
                batches.append(batch)
                tokens += len(batch) * width
                cached_sum += len(batch) * max(shared[i] for i in batch)
                forwards += 1
                b0 += len(batch)
        # the KV kept for later rows, at its peak (after each wave)
        layers, d_model, _, _, _, size = _shape(self.lm)
        per_token = 2 * layers * self._kv_width() * size
        last_child = [-1] * m
        for i in range(m):
            if source[i] >= 0:
                last_child[source[i]] = max(last_child[source[i]], wave[i])
        peak = 0
        for w in sorted(waves):
            alive = sum(keep[i] for i in range(m) if wave[i] <= w < last_child[i])
            peak = max(peak, alive * per_token)
        budget = memory_budget(None, self.device)
        est = forward_seconds(self.lm, tokens, cached=cached_sum // max(1, m), forwards=forwards)
        plan.estimates["tree"] = est if peak <= budget // 2 else float("inf")
        plan.source, plan.batches, plan.keep = source, batches, keep

    def tokens_per_forward(self) -> int:
        """Token positions (padding included) a batched forward aims at: enough that
        the forward's fixed cost and the small-product penalty of the cost model
        stay near 5% of it, and at least :data:`MIN_BATCH_TOKENS` (batches also
        ride out a busy CPU better: fewer thread hand-offs per token).

        Example:
            >>> import attrlab as al
            >>> PrefixRunner(al.wrap(*al.testing.tiny_model("llama"))).tokens_per_forward() > 2048
            True
        """
        one = forward_seconds(self.lm, 0)
        per_tok = forward_seconds(self.lm, 1000) - forward_seconds(self.lm, 999)
        return max(MIN_BATCH_TOKENS, int(20 * one / max(per_tok, 1e-12)))

    def _kv_width(self) -> int:
        """Keys per position and layer (``kv_heads * d_head``)."""
        cfg = self.lm.cfg
        heads = int(getattr(cfg, "n_kv_heads", None) or getattr(cfg, "n_heads", None) or 1)
        d_head = int(getattr(cfg, "d_head", None) or cfg.d_model // max(1, cfg.n_heads))
        return heads * d_head

    # ------------------------------------------------------------ running
    @torch.no_grad()
    def run(
        self,
        rows: Sequence[Sequence[int]] | Rows,
        tail_of: Sequence[int],
        fn: Callable[[Tensor, list[int]], Tensor],
        batch_size: int | str = "auto",
        reuse: bool = True,
        progress: bool = False,
        strategy: str = "auto",
    ) -> list[Tensor]:
        """``fn(logits [b, n, vocab], row indices) -> [b, ...]`` on the positions
        that predict ``tail_of`` after each row (``n = len(tail_of)``); one tensor
        per row. ``batch_size``: at most this many rows per forward (1: the walk);
        ``strategy``: force one of :data:`STRATEGIES`."""
        from tqdm.auto import tqdm

        n = len(tail_of)
        if n == 0:
            raise InputError("the response is empty")
        if not isinstance(rows, Rows):
            rows = Rows.of(rows)
        # lengths are known before any prompt is materialized: check them first
        self._check_len(max(rows.lengths), n)
        plan = self.make_plan(rows, n, batch_size, strategy, reuse)
        self.plan = plan
        tail = list(tail_of[:-1])
        out: list[Tensor | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), disable=not progress, desc="ablations")
        if plan.strategy == "walk":
            self._walk(rows, plan, tail, n, fn, out, bar, reuse)
        elif plan.strategy == "tree":
            self._tree(rows, plan, tail, n, fn, out, bar)
        else:
            self._flat(rows, plan, tail, n, fn, out, bar)
        bar.close()
        return [o for o in out if o is not None]

    def _walk(self, rows, plan, tail, n, fn, out, bar, reuse) -> None:  # type: ignore[no-untyped-def]
        if plan.workers <= 1:
            self._chain(rows, plan.order, tail, n, fn, out, bar, reuse)
            return
        lengths = rows.lengths
        chains = _chains(
            plan.order, [lengths[i] - plan.shared[i] + len(tail) for i in range(len(rows))],
            plan.workers,
        )  # fmt: skip
        fetch_lock = threading.Lock()  # tokenizers are not safe across threads
        fetch = rows.fetch
        locked = Rows(
            rows.lengths, rows.first, rows.common,
            lambda idx: _locked_call(fetch_lock, fetch, idx), rows.walk_order, rows.per_fetch,
        )  # fmt: skip

        def chain(order: list[int]) -> None:
            with torch.no_grad():  # grad mode is per thread
                self._chain(locked, order, tail, n, fn, out, bar, reuse)

        with self.lm.lock:  # held for the chains: they run the model without it
            self._lock_each = False
            try:
                parallel([partial(chain, c) for c in chains])
            finally:
                self._lock_each = True

    def _chain(self, rows, order, tail, n, fn, out, bar, reuse) -> None:  # type: ignore[no-untyped-def]
        """The walk over ``order``, starting with no cache."""
        kv: list[tuple[Tensor, Tensor]] | None = None
        prev: Sequence[int] = []
        for i, row in rows.iterate(order):
            k = min(lcp(prev, row), len(row) - 1) if (reuse and kv is not None) else 0
            new = row[k:] + tail
            cache = _cache_from(kv, k)
            pieces = []
            for s in range(0, len(new), self.chunk):
                piece = new[s : s + self.chunk]
                keep = min(len(piece), max(0, s + len(piece) - (len(new) - n)))
                ids = torch.tensor([piece])
                pos = torch.arange(k + s, k + s + len(piece))[None]
                pieces.append(self._forward(ids, pos, cache, keep))
            logits = torch.cat(pieces, 1)  # [1, n, vocab]
            out[i] = fn(logits, [i])[0]
            kv = _kv_of(cache) if reuse else None
            prev = row
            bar.update(1)

    def _prefix(self, first: Sequence[int], p: int) -> list[tuple[Tensor, Tensor]] | None:
        """The KV of the first ``p`` tokens of ``first`` (None for p = 0)."""
        if p <= 0:
            return None
        cache = _cache_of(None)
        for s in range(0, p, self.chunk):
            piece = list(first[s : min(p, s + self.chunk)])
            pos = torch.arange(s, s + len(piece))[None]
            self._forward(torch.tensor([piece]), pos, cache, 0)
        return _kv_of(cache)

    def _read(self, logits: Tensor, keep: int, width: int, ends: list[int], n: int) -> Tensor:
        """The ``n`` positions before each row's end (``ends``: real tokens per row)."""
        sel = torch.stack([torch.arange(e - n, e) - (width - keep) for e in ends])  # [b, n]
        sel = sel.to(logits.device)
        return logits.gather(1, sel[..., None].expand(-1, -1, logits.shape[-1]))

    def _flat(self, rows, plan, tail, n, fn, out, bar) -> None:  # type: ignore[no-untyped-def]
        p = plan.root
        kv = self._prefix(rows.first, p)
        lengths = rows.lengths
        by_len = sorted(range(len(rows)), key=lambda i: lengths[i])
        budget_tokens = self.tokens_per_forward()
        b0 = 0
        while b0 < len(by_len):
            size = max(1, min(plan.rows, budget_tokens // max(1, lengths[by_len[b0]] + len(tail))))
            idx = by_len[b0 : b0 + size]
            b0 += size
            seqs = [list(r[p:]) + tail for r in rows.fetch(idx)]
            lens = [len(s) for s in seqs]
            width = max(lens)
            # right padding: real tokens stay contiguous after the shared prefix
            # (sliding-window attention counts cache slots, not positions)
            ids = torch.full((len(idx), width), int(seqs[0][0]), dtype=torch.long)
            mask = torch.zeros((len(idx), p + width), dtype=torch.long)
            mask[:, :p] = 1
            for j, seq in enumerate(seqs):
                ids[j, : len(seq)] = torch.tensor(seq)
                mask[j, p : p + len(seq)] = 1
            pos = p + torch.arange(width).expand(len(idx), -1)
            cache = _cache_from(kv, p, len(idx))
            keep = n + width - min(lens)
            logits = self._forward(ids, pos, cache, keep, mask)
            vals = fn(self._read(logits, keep, width, lens, n), idx)
            for j, i in enumerate(idx):
                out[i] = vals[j]
            bar.update(len(idx))

    def _tree(self, rows, plan, tail, n, fn, out, bar) -> None:  # type: ignore[no-untyped-def]
        prefix = self._prefix(rows.first, plan.root)
        root = None if prefix is None else [(k[0], v[0]) for k, v in prefix]
        kept: dict[int, list[tuple[Tensor, Tensor]]] = {}  # row -> its KV [heads, keep, d_head]
        children = [0] * len(rows)
        for s in plan.source:
            if s >= 0:
                children[s] += 1
        for batch in plan.batches:
            toks = dict(zip(batch, rows.fetch(batch)))
            shared = [plan.shared[i] for i in batch]
            seqs = [list(toks[i][k:]) + tail for i, k in zip(batch, shared)]
            lens = [len(s) for s in seqs]
            width, past = max(lens), max(shared)
            b = len(batch)
            ids = torch.full((b, width), int(seqs[0][0]), dtype=torch.long)
            mask = torch.zeros((b, past + width), dtype=torch.long)
            for j, seq in enumerate(seqs):
                ids[j, : len(seq)] = torch.tensor(seq)
                # the cached prefix sits right-aligned before the new tokens (left
                # padding): distances between real tokens equal their positions'
                mask[j, past - shared[j] : past + len(seq)] = 1
            pos = torch.stack([torch.arange(k, k + width) for k in shared])
            srcs = [
                (kept[plan.source[i]] if plan.source[i] >= 0 else root) if k else None
                for i, k in zip(batch, shared)
            ]
            data = self._stack_prefixes(srcs, shared, past)
            cache = _cache_of(data)
            keep = n + width - min(lens)
            padded = any(k != past for k in shared) or any(x != width for x in lens)
            logits = self._forward(ids, pos, cache, keep, mask if padded else None)
            vals = fn(self._read(logits, keep, width, lens, n), batch)
            kv = _kv_of(cache)
            for j, i in enumerate(batch):
                out[i] = vals[j]
                if plan.keep[i]:
                    a = past - shared[j]
                    kept[i] = [
                        (
                            k_[j, :, a : a + plan.keep[i]].clone(),
                            v_[j, :, a : a + plan.keep[i]].clone(),
                        )
                        for k_, v_ in kv
                    ]
                s = plan.source[i]
                if s >= 0:
                    children[s] -= 1
                    if children[s] == 0:
                        kept.pop(s, None)
            bar.update(b)

    @staticmethod
    def _stack_prefixes(
        srcs: list[list[tuple[Tensor, Tensor]] | None], shared: list[int], past: int
    ) -> list[tuple[Tensor, Tensor]] | None:
        """Per layer ``(keys, values) [b, heads, past, d_head]``: row ``j`` holds the
        first ``shared[j]`` positions of ``srcs[j]`` (per layer ``[heads, T, d_head]``),
        right-aligned after zeros (masked out)."""
        ref = next((s for s in srcs if s is not None), None)
        if past == 0 or ref is None:
            return None
        data = []
        for layer, (k0, v0) in enumerate(ref):
            ks = k0.new_zeros((len(srcs), k0.shape[0], past, k0.shape[-1]))
            vs = v0.new_zeros((len(srcs), v0.shape[0], past, v0.shape[-1]))
            for j, (src, k) in enumerate(zip(srcs, shared)):
                if src is not None and k > 0:
                    ks[j, :, past - k :] = src[layer][0][:, :k]
                    vs[j, :, past - k :] = src[layer][1][:, :k]
            data.append((ks, vs))
        return data


def _chains(order: list[int], cost: list[int], k: int) -> list[list[int]]:
    """``order`` cut into ``k`` contiguous non-empty pieces of about equal total
    ``cost`` (per row index).

    Example:
        >>> _chains([3, 0, 1, 2], [1, 1, 1, 1], 2)
        [[3, 0], [1, 2]]
    """
    total = sum(cost[i] for i in order)
    out: list[list[int]] = []
    cur: list[int] = []
    acc = 0
    for j, i in enumerate(order):
        cur.append(i)
        acc += cost[i]
        left_pieces = k - len(out) - 1
        if left_pieces and acc >= total * (len(out) + 1) / k and len(order) - j - 1 >= left_pieces:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def _locked_call(lock: threading.Lock, fn: Callable[[list[int]], Any], idx: list[int]) -> Any:
    with lock:
        return fn(idx)
