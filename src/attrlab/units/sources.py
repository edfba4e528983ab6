"""Sources: the parts of a prompt's context (sentences, paragraphs, documents).

A :class:`Sources` object says how a context is cut into units and how the
prompt is built from it; :meth:`Sources.bind` turns it, a model, a context and
a response into a :class:`SourcesBound` (the contract every estimator uses:
``f(keep)``), whose :class:`SourcePrompt` builds the ablated prompts and
evaluates the response's per-token log-probabilities under many of them.

Ablation removes a source's text. The text between two sources belongs to the
source after it (a separator such as ``" "`` or ``"\\n"``); the first kept
source loses its separator, so ``"A. B. C."`` with ``A`` removed reads
``"B. C."``. Text before the first and after the last source always stays.

Speed: every ablated prompt is tokenized as text (so ablation sees exactly the
tokens a user would get), then the prompts are run by
:class:`attrlab.model.prefixes.PrefixRunner` so that shared prefixes are
encoded once: a walk over the prefix tree of the prompts, the same walk
batched in waves, or length-sorted batches after the common prefix, whichever
its cost model (model width and depth, the prompts' lengths and shared
prefixes, the memory budget) expects to be fastest. Only the response
positions' logits are computed (``logits_to_keep``).

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("llama"))
    >>> units = al.units.Sources(split="sentences")
    >>> p = units.prompt(lm, "Paris is in France. Rome is in Italy.", response=" Paris")
    >>> p.texts
    ['Paris is in France.', 'Rome is in Italy.']
    >>> p.context_text([False, True])
    'Rome is in Italy.'
    >>> p.logprobs([[True, True], [False, True]]).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..ablations import Ablation, Remove
from ..errors import ContextTooLongError, EmptyPromptError, InputError
from ..model.lock import model_lock
from ..model.long_context import (
    LONG_PROMPT,
    announce,
    attention_prefill_chunk,
    long_context_estimate,
)
from ..model.prefixes import STRATEGIES, PrefixRunner, Rows, lcp
from .base import Bound, Units, register_units

__all__ = [
    "Sources",
    "SourcesBound",
    "SourcePrompt",
    "response_of",
    "check_output",
    "SourceNotFoundError",
    "EmptyResponseError",
    "split_text",
]

#: the prompt template used when a query is given (ContextCite's default)
DEFAULT_TEMPLATE = "Context: {context}\n\nQuery: {query}"

SPLITS = ("sentences", "paragraphs", "lines")

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf fig no inc ltd co corp dept approx est "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_SENT_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)")
_NON_SPACE = re.compile(r"\S")


class SourceNotFoundError(InputError):
    """A source given as text does not occur verbatim in the context."""


class EmptyResponseError(EmptyPromptError):
    """The response to attribute is empty (given empty, or the model generated nothing)."""


# ---------------------------------------------------------------- splitting
def _sentence_spans(line: str, offset: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENT_END.finditer(line):
        end = m.end()
        words = line[start : m.start()].split()
        word = words[-1].rstrip(".") if words else ""
        last = word.lower()
        nm = _NON_SPACE.search(line, end)  # the next character (no copy of the rest)
        nxt = nm.group() if nm else ""
        if (
            m.group().startswith(".")
            and (
                last in _ABBREVIATIONS
                or (len(word) == 1 and word.isupper())  # an initial: "J. Smith"
                or ("." in word and nxt[:1].islower())  # "p.m. today", "U.S. law"
            )
        ):
            continue
        seg = line[start:end]
        if seg.strip():
            lead = len(seg) - len(seg.lstrip())
            spans.append((offset + start + lead, offset + end))
        start = end
    seg = line[start:]
    if seg.strip():
        lead = len(seg) - len(seg.lstrip())
        spans.append((offset + start + lead, offset + start + len(seg.rstrip())))
    return spans


def split_text(text: str, by: str = "sentences") -> list[tuple[int, int]]:
    """Character spans ``[(start, end), ...]`` of the sentences, paragraphs or
    lines of ``text`` (offline, by regular expressions; no downloads).

    Sentences never cross a line break; a full stop after a common abbreviation
    (``Dr.``, ``e.g.``) or after an initial does not
    end a sentence, nor does one after a dotted word (``p.m.``) before a
    lower-case word. Paragraphs are separated by blank lines. Spans exclude
    surrounding whitespace.

    Example:
        >>> t = "Dr. Smith went home. He slept!\\nNew line here"
        >>> [t[a:b] for a, b in split_text(t)]
        ['Dr. Smith went home.', 'He slept!', 'New line here']
        >>> t = "a b\\n\\n c d \\n"
        >>> [t[a:b] for a, b in split_text(t, "paragraphs")]
        ['a b', 'c d']
    """
    if by not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {by!r}")
    spans: list[tuple[int, int]] = []
    if by == "paragraphs":
        pos = 0
        for m in re.finditer(r"\n[ \t\r\f\v]*\n\s*", text + "\n\n"):
            seg = text[pos : m.start()]
            if seg.strip():
                lead = len(seg) - len(seg.lstrip())
                spans.append((pos + lead, pos + len(seg.rstrip())))
            pos = m.end()
        return spans
    pos = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        if by == "lines":
            if body.strip():
                lead = len(body) - len(body.lstrip())
                spans.append((pos + lead, pos + len(body.rstrip())))
        else:
            spans.extend(_sentence_spans(body, pos))
        pos += len(line)
    return spans


def _locate(context: str, sources: Sequence[Any]) -> list[tuple[int, int]]:
    """Character spans of user-given sources (texts found verbatim, or spans)."""
    spans: list[tuple[int, int]] = []
    starts: list[int] = []  # the taken spans, sorted by start (they never overlap)
    ends: list[int] = []
    cursor = 0

    def free(a: int, b: int) -> bool:
        k = bisect.bisect_right(starts, a)
        return (k == 0 or ends[k - 1] <= a) and (k == len(starts) or starts[k] >= b)

    def take(a: int, b: int) -> None:
        k = bisect.bisect_right(starts, a)
        starts.insert(k, a)
        ends.insert(k, b)

    for i, s in enumerate(sources):
        if isinstance(s, str):
            if not s.strip():
                raise InputError(f"source {i} is empty")
            # the first occurrence at or after the previous source, else anywhere free
            # (occurrences are searched lazily: the usual case costs one find)
            hit = None
            c = context.find(s, cursor)
            if c >= 0 and free(c, c + len(s)):
                hit = c
            else:
                c = context.find(s)
                while c >= 0 and not free(c, c + len(s)):
                    c = context.find(s, c + 1)
                hit = c if c >= 0 else None
            if hit is None:
                found = (
                    "occurs only overlapping another source"
                    if context.find(s) >= 0
                    else ("does not occur")
                )
                raise SourceNotFoundError(
                    f"source {i} ({s[:60]!r}{'...' if len(s) > 60 else ''}) {found} verbatim in "
                    "the context; give sources as exact substrings of the context (or as "
                    "(start, end) character spans)"
                )
            span = (hit, hit + len(s))
        elif (
            isinstance(s, (tuple, list))
            and len(s) == 2
            and all(isinstance(x, (int, np.integer)) for x in s)
        ):
            span = (int(s[0]), int(s[1]))
            if not 0 <= span[0] < span[1] <= len(context):
                raise InputError(
                    f"source {i}: span {span} is outside the context (0..{len(context)})"
                )
            if not free(*span):
                raise InputError(f"source {i}: span {span} overlaps another source")
        else:
            raise InputError(f"source {i} must be a string or a (start, end) span, got {s!r}")
        spans.append(span)
        take(*span)
        cursor = span[1]
    return spans


def _longest_token(tokenizer: Any) -> int:
    """Characters of the longest token in the vocabulary (at least 1), cached on
    the tokenizer object."""
    cached = getattr(tokenizer, "_attrlab_longest_token", None)
    if isinstance(cached, int):
        return cached
    try:
        n = max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))
    except (AttributeError, NotImplementedError, TypeError):
        return 1 << 30  # unknown: the bound never fires
    try:
        tokenizer._attrlab_longest_token = n
    except AttributeError:
        pass
    return n


def _token_logprobs(response: Sequence[int]) -> Callable[[Tensor, list[int]], Tensor]:
    ids = torch.tensor(list(response), dtype=torch.long)

    def fn(logits: Tensor, rows: list[int]) -> Tensor:
        logp = logits.double().log_softmax(-1)  # [b, n, vocab]
        return logp.gather(-1, ids.to(logp.device).expand(logp.shape[0], -1)[..., None])[
            ..., 0
        ].cpu()

    return fn


# ---------------------------------------------------------------- the prompt
class SourcePrompt:
    """A context cut into sources, bound to a model, a prompt format and a response.

    Build with :meth:`Sources.prompt`. Masks are ``[n_masks, n_sources]`` bools
    (True = keep the source).

    Attributes:
        context: the context text.
        spans: ``(start, end)`` character span of each source in ``context``.
        texts: each source's text.
        response_ids: the response's token ids (fixed under ablation).
        response: the response text.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> p = al.units.Sources(query="Where?").prompt(lm, "A is here. B is there.", " here")
        >>> p.prompt_text([True, False])
        'Context: A is here.\\n\\nQuery: Where?'
    """

    def __init__(
        self,
        lm: Any,
        context: str,
        spans: list[tuple[int, int]],
        query: str | None,
        template: str,
        chat: bool,
        response: str | Sequence[int] | None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        seed: int = 0,
    ):
        self.lm = lm
        self.tokenizer = lm._require_tokenizer()
        self.context = context
        self.spans = spans
        self.texts = [context[a:b] for a, b in spans]
        self.query = query
        self.template = template
        self.chat = chat
        order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        self._order = order
        # text before each source (in position order), owned by that source
        self._lead = context[: spans[order[0]][0]]
        self._trail = context[spans[order[-1]][1] :]
        self._seps = {}
        prev_end = None
        for i in order:
            a, _ = spans[i]
            self._seps[i] = "" if prev_end is None else context[prev_end:a]
            prev_end = spans[i][1]
        self.response_ids = self._response_ids(response, max_new_tokens, do_sample, seed)
        self.response = self.tokenizer.decode(self.response_ids)

    @property
    def n_sources(self) -> int:
        return len(self.spans)

    # ------------------------------------------------------------ text
    def _mask(self, mask: Any) -> list[bool]:
        m = [bool(x) for x in (mask.tolist() if hasattr(mask, "tolist") else mask)]
        if len(m) != self.n_sources:
            raise InputError(f"a mask has {len(m)} entries for {self.n_sources} sources")
        return m

    def context_text(self, mask: Any = None) -> str:
        """The context with the sources where ``mask`` is False removed."""
        return self._context_layout(mask)[0]

    def _context_layout(self, mask: Any = None) -> tuple[str, dict[int, tuple[int, int]]]:
        """The ablated context and the character span of each kept source in it."""
        keep = [True] * self.n_sources if mask is None else self._mask(mask)
        parts = [self._lead]
        at = len(self._lead)
        where: dict[int, tuple[int, int]] = {}
        first = True
        for i in self._order:
            if keep[i]:
                if not first:
                    parts.append(self._seps[i])
                    at += len(self._seps[i])
                parts.append(self.texts[i])
                where[i] = (at, at + len(self.texts[i]))
                at += len(self.texts[i])
                first = False
        parts.append(self._trail)
        return "".join(parts), where

    def _render(self, context: str) -> str:
        fields = {"context": context, "query": self.query or ""}
        try:
            prompt = self.template.format(**fields)
        except (KeyError, IndexError) as e:
            raise InputError(
                f"bad template {self.template!r}: use the fields {{context}} and {{query}} "
                f"(double other braces): {e}"
            ) from e
        if not self.chat:
            return prompt
        return str(
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        )

    def prompt_text(self, mask: Any = None) -> str:
        """The full prompt (template and chat template applied) for one mask."""
        return self._render(self.context_text(mask))

    def _encode(self, texts: list[str]) -> list[list[int]]:
        enc = self.tokenizer(texts, add_special_tokens=not self.chat)["input_ids"]
        return [list(x) for x in enc]

    def prompt_ids(self, masks: Any = None) -> list[list[int]]:
        """Token ids of the ablated prompts, one list per mask (all sources kept if None).

        A prompt that is empty once ablated (no template, no special tokens, every
        source removed) becomes the BOS token alone, so the response's first token
        still has a prediction.
        """
        if masks is None:
            masks = [[True] * self.n_sources]
        rows = self._encode([self.prompt_text(m) for m in masks])
        for r in rows:
            if not r:
                r.append(self.lm.token_id(self._bos_id()))
        return rows

    def _distinct_rows(self, masks: Tensor, per_call: int = 64) -> tuple[Rows, list[int]]:
        """The distinct ablated prompts of ``masks`` (identical prompts are run once),
        tokenized on demand, and for each mask the index of its prompt among them.

        One pass tokenizes ``per_call`` prompts at a time and keeps only each
        distinct prompt's length and a digest of its tokens, so memory grows with the
        number of masks, not with masks x context length; the runner tokenizes
        each batch again when it runs it.
        """
        seen: dict[bytes, int] = {}
        where: list[int] = []
        reps: list[int] = []  # one mask per distinct prompt
        lengths: list[int] = []
        first: list[int] = []
        common = 0
        for b0 in range(0, masks.shape[0], per_call):
            for j, r in enumerate(self.prompt_ids(masks[b0 : b0 + per_call])):
                key = hashlib.blake2b(np.asarray(r, np.int64).tobytes(), digest_size=16).digest()
                k = seen.get(key)
                if k is None:
                    k = seen[key] = len(reps)
                    reps.append(b0 + j)
                    lengths.append(len(r))
                    if k == 0:
                        first, common = r, len(r)
                    else:
                        common = min(common, lcp(first, r))
                where.append(k)

        def fetch(idx: list[int]) -> list[list[int]]:
            return self.prompt_ids(masks[[reps[i] for i in idx]])

        def walk_order() -> list[int]:
            # prompts that keep the same leading sources (in context order) share a
            # token prefix: order them as the lists of kept sources, lexicographically
            # (a depth-first walk of their prefix tree, a prompt before its extensions),
            # i.e. as the removed-flags in context order without their trailing run
            removed = (~masks[reps][:, self._order]).numpy().astype(np.uint8)
            keys = [row.tobytes().rstrip(b"\x01") for row in removed]
            return sorted(range(len(reps)), key=keys.__getitem__)

        return Rows(lengths, first, common, fetch, walk_order), where

    def _bos_id(self) -> int:
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self.tokenizer, attr, None)
            if v is not None:
                return int(v)
        return self.lm.pad_token_id

    # -------------------------------------------------------- response
    def _response_ids(
        self, response: str | Sequence[int] | None, max_new_tokens: int, do_sample: bool, seed: int
    ) -> list[int]:
        prompt = self.prompt_text()
        # a bound that needs no tokenization first: a token covers about as many
        # characters as its vocabulary entry (x2 margin for normalizers that compose
        # characters), so a prompt far too long for the model fails at once
        # (10,000 sources: before tokenizing 70k tokens)
        per_token = 2 * _longest_token(self.tokenizer)
        self._check_fits(-(-len(prompt) // per_token), 1, bound=True)
        p_ids = self._encode([prompt])[0]
        # every ablated prompt is (about) as long as the full one at most: check the
        # full prompt's token count before generating or building any ablation
        self._check_fits(len(p_ids), 1)
        ids: list[int]
        if response is None:
            ids = self._generate(p_ids, max_new_tokens, do_sample, seed)
            if not ids:
                raise EmptyResponseError(
                    "the model generated an empty response (it stopped at once); give "
                    "response=... to attribute a fixed text"
                )
        elif isinstance(response, str):
            if response == "":
                raise EmptyResponseError("the response is empty: give at least one token")
            # tokenize prompt + response together, as the model would read it
            full = self._encode([prompt + response])[0]
            if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
                ids = full[len(p_ids) :]
            else:
                ids = list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        else:
            ids = [self.lm.token_id(int(t)) for t in response]
            if not ids:
                raise EmptyResponseError("the response is empty: give at least one token")
        self._check_fits(len(p_ids), len(ids))
        return ids

    def _check_fits(self, n_prompt: int, n_response: int, bound: bool = False) -> None:
        """Raise :class:`ContextTooLongError` if the full prompt and the response do
        not fit the model's context (checked on token counts, before any forward;
        ``bound``: ``n_prompt`` is a lower bound)."""
        n_ctx = self.lm.cfg.n_ctx
        total = n_prompt + n_response - 1
        if n_ctx is not None and total > n_ctx:
            raise ContextTooLongError(
                f"the prompt with all {self.n_sources} sources has {'at least ' * bound}"
                f"{n_prompt} tokens and the "
                f"response {n_response}: {total} tokens run, but this model's context is "
                f"{n_ctx}. Use fewer or shorter sources (or a model with a longer context)."
            )

    def _generate(
        self, p_ids: list[int], max_new_tokens: int, do_sample: bool, seed: int
    ) -> list[int]:
        model = self.lm.model
        ids = torch.tensor([p_ids], device=self.lm.device)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        kw: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=self.lm.pad_token_id,
        )
        if not do_sample:
            kw.update(temperature=None, top_p=None, top_k=None)
        with model_lock(model), torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        new = out[0, len(p_ids) :].tolist()
        stops = {eos} if eos is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stops |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        for j, t in enumerate(new):
            if t in stops:
                return new[:j]
        return new

    def source_token_ranges(self) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of the full prompt and, per source, its ``[start, end)`` token range.

        Needs a fast tokenizer (offset mappings).
        """
        ids, ranges = self.token_ranges(None)
        return ids, [r if r is not None else (0, 0) for r in ranges]

    def token_ranges(self, mask: Any = None) -> tuple[list[int], list[tuple[int, int] | None]]:
        """Token ids of the prompt with only the sources of ``mask`` kept and, per
        source, its ``[start, end)`` token range in it (None for a removed source;
        ``(0, 0)`` for a kept source that got no token of its own).

        Needs a fast tokenizer (offset mappings).

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("llama"))
            >>> p = al.units.Sources().prompt(lm, "A is red. B is blue.", " red")
            >>> ids, ranges = p.token_ranges([False, True])
            >>> ranges[0] is None, ranges[1][1] - ranges[1][0] > 0
            (True, True)
        """
        context, where = self._context_layout(mask)
        mark = "\ue000"
        marked = self._render(mark)
        prompt = self._render(context)
        off = marked.find(mark)
        if off < 0 or prompt[off : off + len(context)] != context:
            off = prompt.find(context)
        if off < 0:
            raise InputError("cannot find the context inside the rendered prompt")
        enc = self.tokenizer(prompt, add_special_tokens=not self.chat, return_offsets_mapping=True)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        idx = np.flatnonzero(offsets[:, 1] > offsets[:, 0])  # tokens with text, in order
        starts, ends = offsets[idx, 0], offsets[idx, 1]
        ranges: list[tuple[int, int] | None] = []
        for i in range(self.n_sources):
            if i not in where:
                ranges.append(None)
                continue
            a, b = where[i][0] + off, where[i][1] + off
            # the tokens overlapping [a, b): end > a and start < b (offsets increase)
            lo = int(np.searchsorted(ends, a, side="right"))
            hi = int(np.searchsorted(starts, b, side="left"))
            ranges.append((int(idx[lo]), int(idx[hi - 1]) + 1) if hi > lo else (0, 0))
        return list(enc["input_ids"]), ranges

    # ------------------------------------------------------------- runs
    def run(
        self,
        masks: Any,
        fn: Callable[[Tensor, list[int]], Tensor] | None = None,
        batch_size: int | str = "auto",
        reuse: bool = True,
        progress: bool = False,
        stats: dict[str, Any] | None = None,
        strategy: str = "auto",
    ) -> list[Tensor]:
        """Apply ``fn(logits [b, n_response, vocab], row_indices) -> [b, ...]`` to the
        response positions of every ablated prompt; returns one tensor per mask.

        Identical prompts are run once (``row_indices`` index the distinct prompts).
        ``batch_size``: at most this many prompts per forward (1: the prefix-tree
        walk); ``strategy``: one of :data:`attrlab.model.prefixes.STRATEGIES`
        (``"auto"``: the cost model's choice). ``stats`` (if given) accumulates
        ``n_tokens`` run through the model, ``n_forwards`` and ``n_prompts``
        (distinct prompts), and records the ``strategy`` run.
        """
        masks = _as_masks(masks, self.n_sources)
        unique, where = self._distinct_rows(masks)
        # long prompts are prefilled in chunks sized to the memory budget (the eager
        # attention of a chunk is chunk x length per head): memory linear in the length
        n_resp = len(self.response_ids)
        longest = max(unique.lengths) + n_resp - 1
        chunk = attention_prefill_chunk(self.lm, longest)
        if longest > LONG_PROMPT or (progress and longest > chunk):
            est = long_context_estimate(self.lm, longest, 0, chunk, kv_copies=2)
            est += 2 * n_resp * int(self.lm.cfg.d_vocab) * 8  # the response's logits
            announce(self.lm, f"{len(unique)} ablated prompts of up to {longest} tokens "
                     f"(prefill chunks of {chunk})", est, progress)  # fmt: skip
        runner = PrefixRunner(self.lm, self.lm.cfg.n_ctx, chunk=chunk)
        with model_lock(self.lm.model):
            out = runner.run(
                unique,
                self.response_ids,
                fn or _token_logprobs(self.response_ids),
                batch_size,
                reuse,
                progress,
                strategy,
            )
        if stats is not None:
            stats["n_tokens"] = stats.get("n_tokens", 0) + runner.n_tokens
            stats["n_forwards"] = stats.get("n_forwards", 0) + runner.n_forwards
            stats["n_prompts"] = stats.get("n_prompts", 0) + len(unique)
            if runner.plan is not None:
                stats["strategy"] = runner.plan.strategy
                stats["workers"] = runner.plan.workers
        return [out[w] for w in where]

    def logprobs(
        self,
        masks: Any,
        batch_size: int | str = "auto",
        reuse: bool = True,
        progress: bool = False,
        stats: dict[str, Any] | None = None,
        strategy: str = "auto",
    ) -> Tensor:
        """Per-token log-probabilities of the response under each mask, ``[n_masks, n_response]``
        (float64); options as :meth:`run`."""
        return torch.stack(self.run(masks, None, batch_size, reuse, progress, stats, strategy))


def _as_masks(masks: Any, n_sources: int) -> Tensor:
    m = torch.as_tensor(np.asarray(masks.cpu() if isinstance(masks, Tensor) else masks))
    if m.dim() == 1:
        m = m[None]
    if m.dim() != 2 or m.shape[1] != n_sources:
        raise InputError(f"masks must be [n_masks, {n_sources}], got {tuple(m.shape)}")
    if m.shape[0] == 0:
        raise InputError("no masks given")
    return m.bool()


def reduce_logprobs(per_token: Tensor, output: str = "log_prob") -> Tensor:
    """Sequence-level value from per-token log-probabilities ``[..., n_tokens]``.

    ``"log_prob"``: the response's total log-probability; ``"logit_prob"``: the
    log-odds ``log p - log(1 - p)`` of the whole response (ContextCite's
    output); ``"mean_log_prob"``: the mean per token.

    Example:
        >>> import torch
        >>> float(reduce_logprobs(torch.tensor([[0.5, 0.5]]).log(), "logit_prob")[0])
        -1.0986...
    """
    s = per_token.double().sum(-1)
    if output == "log_prob":
        return s
    if output == "mean_log_prob":
        return s / per_token.shape[-1]
    if output == "logit_prob":
        return s - torch.log(-torch.expm1(s.clamp(max=-1e-12)))
    raise InputError(f"output must be 'log_prob', 'logit_prob' or 'mean_log_prob', got {output!r}")


# ---------------------------------------------------------------- the unit kind
OUTPUTS = ("log_prob", "logit_prob", "mean_log_prob")


def check_output(output: str) -> str:
    """``output`` if it is one of :data:`OUTPUTS`, else a typed error.

    Example:
        >>> check_output("logit_prob")
        'logit_prob'
    """
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    return output


def check_batch_size(batch_size: Any) -> None:
    """Refuse a ``batch_size`` that is not None, ``"auto"`` or a positive int.

    Example:
        >>> check_batch_size("auto")
        >>> check_batch_size(0)
        Traceback (most recent call last):
        ...
        attrlab.errors.InputError: batch_size must be a positive int or 'auto', got 0
    """
    if (
        batch_size is not None
        and batch_size != "auto"
        and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1)
    ):
        raise InputError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")


def response_of(target: Any) -> str | list[int] | None:
    """The response a sources question attributes, from a ``target=``: text,
    token ids (a list or a tensor), an :class:`~attrlab.targets.ContinuationLogProb`,
    or None (generate it).

    Raises:
        InputError: anything else (a logit difference, a callable …).

    Example:
        >>> response_of(" Paris"), response_of([5, 6])
        (' Paris', [5, 6])
    """
    from ..targets import ContinuationLogProb

    if isinstance(target, ContinuationLogProb):
        target = target.continuation
    if target is None or isinstance(target, str):
        return target
    if isinstance(target, Tensor):
        target = target.reshape(-1).tolist()
    if isinstance(target, (list, tuple)) and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in target
    ):
        return [int(t) for t in target]
    raise InputError(
        "the target of a sources attribution is the response: text, token ids or "
        "al.targets.ContinuationLogProb"
    )


@register_units("sources", "source")
class Sources(Units):
    """Sources of a context: sentences, paragraphs, lines, or given documents.

    Bound to a question (:meth:`bind`) the kind gives ``f(keep)``: the
    response's log-probability (``output``) with only the kept sources' text in
    the prompt (the ablation is :class:`~attrlab.ablations.Remove`), many masks
    per forward with shared prefixes encoded once. The target is the response
    (text, token ids, or None to generate it).

    Args:
        sources: the sources as texts that occur verbatim in the context (e.g. the
            documents of a RAG prompt), or ``(start, end)`` character spans;
            None to split the context with ``split``.
        split: ``"sentences"`` (default), ``"paragraphs"`` or ``"lines"``.
        query: a question appended by ``template``; None when the context is the
            whole prompt.
        template: how the prompt is built, with fields ``{context}`` and
            ``{query}``; default ``"Context: {context}\\n\\nQuery: {query}"`` with a
            query and ``"{context}"`` without.
        chat_template: wrap the prompt as a user message with the tokenizer's chat
            template; None = when the tokenizer has one.
        output: what ``f`` measures: ``"log_prob"``, ``"logit_prob"`` (the
            response's log-odds, ContextCite's choice) or ``"mean_log_prob"``;
            None: the method's preference (``logit_prob`` for contextcite,
            else ``log_prob``).
        per_token: one target row per response token (scores
            ``[n_response_tokens, n_sources]``).
        do_sample, seed: how a response is generated when none is given
            (greedy by default; sampling seeded by ``seed``).
        strategy: how the ablated prompts are run (:data:`attrlab.model.prefixes.STRATEGIES`:
            ``"walk"``, ``"tree"``, ``"flat"``); ``"auto"`` (default): the cost
            model's choice. Values do not depend on it (beyond float round-off).

    These fields may also be given to :func:`attrlab.attribute` as options
    (``query=``, ``output=`` …).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> b = al.units.Sources().bind(lm, "A is red. B is blue.", " red")
        >>> b.n, tuple(b.f([[True, True], [False, True]]).shape)
        (2, (2, 1))
    """

    provides = frozenset({"f"})
    ablations = (Remove,)
    target_kind = "raw"

    def __init__(
        self,
        sources: Sequence[Any] | None = None,
        split: str = "sentences",
        query: str | None = None,
        template: str | None = None,
        chat_template: bool | None = None,
        output: str | None = None,
        per_token: bool = False,
        do_sample: bool = False,
        seed: int = 0,
        strategy: str = "auto",
    ):
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, got {split!r}")
        if sources is not None and (isinstance(sources, str) or not isinstance(sources, Sequence)):
            raise InputError("sources must be a list of texts or (start, end) spans")
        self.sources = (
            [s if isinstance(s, str) else list(s) for s in sources] if sources is not None else None
        )
        self.split = split
        self.query = query
        self.template = template
        self.chat_template = chat_template
        self.output = None if output is None else check_output(output)
        self.per_token = bool(per_token)
        self.do_sample = bool(do_sample)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        if strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self._bound: tuple[Any, ...] | None = None

    def updated(self, **changes: Any) -> Sources:
        """A copy with some fields changed (None values are ignored).

        Raises:
            InputError: a field is set on the object and given again differently.

        Example:
            >>> Sources().updated(query="Why?").query
            'Why?'
        """
        fields = {k: v for k, v in self.params().items()}
        defaults = Sources().params()
        for k, v in changes.items():
            if v is None:
                continue
            if k not in fields:
                raise InputError(f"unknown Sources option {k!r}")
            if fields[k] != defaults[k] and fields[k] != v:
                raise InputError(
                    f"{k}= is given both in the units object and as an option; give it once"
                )
            fields[k] = v
        return Sources(**fields)

    def resolve_target(self, target: Any, lm: Any) -> Any:
        """The response (see :func:`response_of`); a sources target is not a logit."""
        return response_of(target)

    def prompt(
        self,
        lm: Any,
        context: str,
        response: str | Sequence[int] | None = None,
        max_new_tokens: int = 64,
    ) -> SourcePrompt:
        """Cut ``context`` into sources and fix the response (generated if None,
        ``max_new_tokens`` at most, with this object's ``do_sample`` / ``seed``).

        Raises:
            EmptyPromptError: the context is empty.
            InputError: fewer than two sources, or a bad option.
            SourceNotFoundError: a source text is not in the context.
            EmptyResponseError: the response is empty.

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("llama"))
            >>> al.units.Sources().prompt(lm, "A is red. B is blue.", " red").texts
            ['A is red.', 'B is blue.']
        """
        if not isinstance(context, str):
            raise InputError(
                "units='sources' attributes one context at a time: give the context as a string"
            )
        if not context.strip():
            raise EmptyPromptError("the context is empty: give a text to cut into sources")
        if self.sources is not None:
            spans = _locate(context, self.sources)
        else:
            spans = split_text(context, self.split)
        if len(spans) < 2:
            raise InputError(
                f"the context has {len(spans)} source(s); attributing among sources needs at "
                "least two: split it finer (split='sentences') or give sources=[...]"
            )
        tok = lm._require_tokenizer()
        has_chat = bool(getattr(tok, "chat_template", None))
        if self.chat_template and not has_chat:
            raise InputError("chat_template=True, but the tokenizer has no chat template")
        chat = has_chat if self.chat_template is None else bool(self.chat_template)
        template = self.template
        if template is None:
            template = DEFAULT_TEMPLATE if self.query is not None else "{context}"
        elif "{context}" not in template:
            raise InputError("the template must contain the field {context}")
        response = response_of(response)
        # a generated response is reused by later binds of the same context
        b = self._bound
        if response is None and b is not None and b[:3] == (id(lm), context, max_new_tokens):
            return b[3]  # type: ignore[no-any-return]
        prompt = SourcePrompt(
            lm,
            context,
            spans,
            self.query,
            template,
            chat,
            response,
            max_new_tokens,
            self.do_sample,
            self.seed,
        )
        self._bound = (id(lm), context, max_new_tokens, prompt)
        return prompt

    def bind(  # type: ignore[override]  # a kind names the bind options it takes
        self,
        lm: Any,
        inputs: Any,
        target: Any = None,
        ablation: Ablation | None = None,
        output: str | None = None,
        batch_size: int | str | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
    ) -> SourcesBound:
        """The sources of the context ``inputs`` bound to a response (``target``;
        None: generate one, at most ``max_new_tokens``, default 64).

        ``output``: the method's preference when the units give none.
        ``batch_size``: at most this many prompts per forward (None / ``"auto"``:
        the cost model's choice, see :mod:`attrlab.model.prefixes`; 1 walks the
        prefix tree one prompt at a time).

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> b = al.units.Sources().bind(lm, "A is red. B is blue.", " red")
            >>> b.labels()["text"]
            ['A is red.', 'B is blue.']
        """
        ablation = self.check_ablation(ablation)
        check_batch_size(batch_size)
        out = check_output(self.output or output or "log_prob")
        prompt = self.prompt(lm, inputs, response_of(target), max_new_tokens or 64)
        return SourcesBound(self, ablation, prompt, out, batch_size or "auto", progress)


class SourcesBound(Bound):
    """Sources bound to a context and a response: ``f(keep)`` is the response's
    ``output`` with only the kept sources (``[m, 1]``, or ``[m, n_response]``
    with ``per_token``). Per-token log-probabilities are kept per distinct
    mask, so a mask evaluated twice (the full context by ``clean()`` and by an
    estimator) costs one run.

    Example:
        >>> import attrlab as al, torch
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> b = al.units.Sources().bind(lm, "A is red. B is blue.", " red")
        >>> bool(torch.allclose(b.f(torch.ones(1, 2, dtype=torch.bool))[0], b.clean()))
        True
    """

    units: Sources

    def __init__(
        self,
        units: Sources,
        ablation: Ablation | None,
        prompt: SourcePrompt,
        output: str,
        batch_size: int | str,
        progress: bool,
    ):
        self.units = units
        self.ablation = ablation
        self.prompt = prompt
        self.lm = prompt.lm
        self.output = output
        self.batch_size = batch_size
        self.progress = progress
        self.n = prompt.n_sources
        self.per_token = bool(getattr(units, "per_token", False))
        self.strategy = str(getattr(units, "strategy", "auto"))
        self.n_rows = len(prompt.response_ids) if self.per_token else 1
        self.target_name = f"response_{output}({prompt.response!r})"
        self.stats: dict[str, Any] = {}
        self._memo: dict[bytes, Tensor] = {}  # mask bits -> per-token log-probs [n_response]

    @property
    def output_tokens(self) -> int:
        """Response tokens each target row sums over (ContextCite's Lasso divides
        its outputs by it)."""
        return 1 if self.per_token else len(self.prompt.response_ids)

    def labels(self) -> dict[str, list[Any]]:
        return {"source": list(range(self.n)), "text": list(self.prompt.texts)}

    def logprobs(self, keep: Any) -> Tensor:
        """Per-token log-probabilities of the response ``[m, n_response]`` (float64)."""
        k = self.check_keep(keep).cpu()
        keys = [np.packbits(row.numpy()).tobytes() for row in k]
        todo = sorted({i for i, key in enumerate(keys) if key not in self._memo},
                      key=keys.__getitem__)  # fmt: skip
        todo = list({keys[i]: i for i in todo}.values())  # one run per distinct mask
        if todo:
            for i, row in zip(todo, self._evaluate(k[todo])):
                self._memo[keys[i]] = row
        return torch.stack([self._memo[key] for key in keys])

    def _evaluate(self, keep: Tensor) -> Tensor:
        """Per-token log-probabilities ``[m, n_response]`` of distinct masks (the
        ablated prompts run by the prefix runner); :meth:`logprobs` memoizes them."""
        return self.prompt.logprobs(
            keep,
            batch_size=self.batch_size,
            progress=self.progress,
            stats=self.stats,
            strategy=self.strategy,
        )

    def f(self, keep: Tensor) -> Tensor:
        lp = self.logprobs(keep)  # [m, n_response]
        if not self.per_token:
            return reduce_logprobs(lp, self.output)[:, None]
        return torch.stack(
            [reduce_logprobs(lp[:, i : i + 1], self.output) for i in range(lp.shape[1])], 1
        )

    def row_labels(self) -> dict[str, list[Any]]:
        return {"token": self.lm.to_str_tokens(self.prompt.response_ids)}

    def meta(self) -> dict[str, Any]:
        p = self.prompt
        return {
            "context": p.context,
            "spans": [list(s) for s in p.spans],
            "prompt": p.prompt_text(),
            "response": p.response,
            "response_ids": list(p.response_ids),
            "response_tokens": self.lm.to_str_tokens(p.response_ids),
            "output": self.output,
        }

    def run_stats(self) -> dict[str, Any]:
        return dict(self.stats)

    def result_extra(self, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        """With the estimator's design ``masks``, their per-token log-probabilities
        (``logprobs``), so a response span can be attributed again without new
        forwards (:func:`attrlab.methods.contextcite.attribute_span`)."""
        if "masks" in extra and "logprobs" not in extra:
            extra["logprobs"] = self.logprobs(extra["masks"])
        return extra
