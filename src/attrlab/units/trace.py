"""Trace sentences: the sentences of a chain of thought the model writes.

``units="trace"`` (or ``al.units.Trace(max_new_tokens=...)``) makes the units
the sentences of the model's own greedy continuation of the prompt (or of a
given ``trace`` text): the reasoning steps that the Thought Anchors methods
(:mod:`attrlab.methods.thought_anchors`) score. A sentence ends after ``.``,
``!``, ``?`` or a newline (the split of ``units="sentences"``); generation
stops at the end-of-text token or after ``max_new_tokens``.

Each generated token belongs to the sentence holding its first non-space
character; the labels are ``sentence`` (index), ``text``, ``start`` and ``end``
(token positions of the prepared input, BOS included, end exclusive).

Bound to a question (:meth:`Trace.bind`), the kind gives the contract every
estimator uses, ``f(keep)``: the log-probability of the answer (by default the
trace's last sentence, as the model wrote it; or a given ``target`` text after
the whole trace) with only the kept sentences' text left in the trace (the
default ablation, :class:`~attrlab.ablations.Remove`, as for sources: the prompt
and kept sentences are tokenized again as text), or with the dropped sentences
kept in the text but unread by every later position
(:class:`~attrlab.ablations.Suppress`, ``ablation="suppress"``). So
occlusion, Shapley values, KernelSHAP, LIME and ContextCite run over reasoning
steps, and ``al.evaluate`` scores any trace result (LDS, deletion curves)
against the same ``f``. Removal runs its prompts through the sources' prefix
runner (:class:`attrlab.model.prefixes.PrefixRunner`), which encodes shared
leading text once; suppression runs the full trace once per chunk of masks.

Example:
    >>> import attrlab as al
    >>> lm = al.zoo.load("reasoning")
    >>> ex = al.zoo.task("reasoning").examples(1)[0]
    >>> view = al.units.Trace().prepare(lm, ex.prompt)
    >>> view.texts == ex.steps
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..ablations import Ablation, Remove, Suppress
from ..errors import ContextTooLongError, InputError
from .base import Units, register_units
from .sources import SourcePrompt, SourcesBound, check_batch_size, check_output, response_of

__all__ = ["Trace", "TraceBound", "TraceView", "greedy_continuation"]


@dataclass
class TraceView:
    """A prompt and the trace after it, split into sentences.

    Attributes:
        ids: token ids of prompt + trace ``[pos]`` (BOS first; no end-of-text token).
        n_prompt: how many positions are the prompt.
        prompt: the prompt text.
        trace: the trace text (decoded continuation).
        texts: the sentences of the trace.
        spans: token positions ``(start, end)`` of each sentence in ``ids``.
        chars: character spans ``(start, end)`` of each sentence in ``trace``.
        ended: whether the trace ended with the end-of-text token.
        tokens: each token of ``ids`` decoded on its own.
    """

    ids: list[int]
    n_prompt: int
    prompt: str
    trace: str
    texts: list[str]
    spans: list[tuple[int, int]]
    ended: bool = True
    tokens: list[str] = field(default_factory=list)
    chars: list[tuple[int, int]] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Number of sentences."""
        return len(self.texts)

    def labels(self) -> dict[str, list[Any]]:
        """Unit label columns: ``sentence``, ``text``, ``start``, ``end``."""
        return {
            "sentence": list(range(self.n)),
            "text": list(self.texts),
            "start": [a for a, _ in self.spans],
            "end": [b for _, b in self.spans],
        }

    def meta(self) -> dict[str, Any]:
        """JSON-able facts for a result's ``meta``."""
        return {
            "prompt": self.prompt,
            "trace": self.trace,
            "ids": self.ids,
            "tokens": self.tokens,
            "n_prompt": self.n_prompt,
            "ended": self.ended,
        }


def greedy_continuation(lm: Any, ids: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """Greedy tokens after ``ids`` until the end-of-text token (not included)
    or ``max_new_tokens``, one cached forward per token; ``(tokens, ended)``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> toks, ended = greedy_continuation(lm, lm.encode("a b"), 3)
        >>> len(toks) <= 3
        True
    """
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    out: list[int] = []
    with torch.no_grad():
        logits, kv = lm.hf_forward(torch.tensor([ids], device=lm.device), use_cache=True)
        for step in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            if eos is not None and nxt == eos:
                return out, True
            out.append(nxt)
            if step + 1 == max_new_tokens:
                break
            pos = torch.tensor([[len(ids) + len(out) - 1]], device=lm.device)
            logits, kv = lm.hf_forward(
                torch.tensor([[nxt]], device=lm.device),
                position_ids=pos,
                kv_cache=kv,
                use_cache=True,
            )
    return out, False


def split_sentences(
    lm: Any, prompt_len: int, trace_ids: list[int]
) -> tuple[str, list[str], list[tuple[int, int]], list[tuple[int, int]]]:
    """``(trace text, sentence texts, token spans, character spans)`` of generated
    ``trace_ids`` (token positions counted from the start of the prepared input,
    ``prompt_len`` first; character spans in the trace text)."""
    from .tokens import Sentences

    tok = lm.tokenizer
    pieces = [tok.decode([t]) for t in trace_ids]
    text = "".join(pieces)
    bounds = Sentences().spans(text)
    starts: list[int] = []
    c = 0
    for p in pieces:  # first non-space character of each token
        k = len(p) - len(p.lstrip())
        starts.append(c + k if k < len(p) else c)
        c += len(p)
    texts, spans, chars = [], [], []
    for a, b in bounds:
        pos = [i for i, s in enumerate(starts) if a <= s < b]
        if pos:
            texts.append(text[a:b])
            spans.append((prompt_len + pos[0], prompt_len + pos[-1] + 1))
            chars.append((a, b))
    return text, texts, spans, chars


@register_units("trace")
class Trace(Units):
    """One unit per sentence of the trace the model writes after the prompt.

    Args:
        max_new_tokens: longest trace generated (greedy, stops at end-of-text).
        trace: a given trace text to use instead of generating one (its tokens
            are appended to the prompt's).
        output: what ``f`` measures of the answer: ``"log_prob"``,
            ``"logit_prob"`` or ``"mean_log_prob"`` (as for
            :class:`~attrlab.units.Sources`); None: the method's preference.

    Example:
        >>> import attrlab as al
        >>> al.units.resolve("trace").kind
        'trace'
    """

    provides = frozenset({"f"})
    ablations = (Remove, Suppress)
    target_kind = "raw"

    def __init__(
        self, max_new_tokens: int = 96, trace: str | None = None, output: str | None = None
    ):
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 1
        ):
            raise InputError(
                f"trace: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}"
            )
        if trace is not None and not isinstance(trace, str):
            raise InputError(f"trace: trace must be a string or None, got {type(trace).__name__}")
        self.max_new_tokens = max_new_tokens
        self.trace = trace
        self.output = None if output is None else check_output(output)

    def updated(self, **options: Any) -> Trace:
        """A copy with some options changed."""
        return Trace(**{**self.params(), **options})

    def resolve_target(self, target: Any, lm: Any) -> Any:
        return target

    def prepare(self, lm: Any, inputs: Any) -> TraceView:
        """The prompt, its trace (generated greedily unless given) and the sentences.

        Raises:
            InputError: not one text prompt, or a trace with no sentence.
            ContextTooLongError: prompt + trace longer than the model's context.
        """
        if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
            inputs = inputs[0]
        if not isinstance(inputs, str):
            raise InputError("units='trace' explain one text prompt at a time; pass a string")
        ids = lm.tokenize(inputs).input_ids[0].tolist()
        n_ctx = lm.cfg.n_ctx
        if self.trace is not None:
            gen = lm.tokenizer(self.trace, add_special_tokens=False)["input_ids"]
            ended = True
        else:
            if n_ctx is not None and len(ids) >= n_ctx:
                raise ContextTooLongError(
                    f"the prompt has {len(ids)} tokens; this model's context is {n_ctx}"
                )
            budget = (
                self.max_new_tokens if n_ctx is None else min(self.max_new_tokens, n_ctx - len(ids))
            )
            gen, ended = greedy_continuation(lm, ids, budget)
        if n_ctx is not None and len(ids) + len(gen) > n_ctx:
            raise ContextTooLongError(
                f"prompt + trace is {len(ids) + len(gen)} tokens; this model's context is {n_ctx}"
            )
        text, texts, spans, chars = split_sentences(lm, len(ids), gen)
        if not texts:
            raise InputError(
                "the trace has no sentence to attribute (the model wrote nothing); "
                "check the prompt or give trace='...'"
            )
        full = ids + gen
        return TraceView(
            ids=full,
            n_prompt=len(ids),
            prompt=inputs,
            trace=text,
            texts=texts,
            spans=spans,
            ended=ended,
            tokens=lm.to_str_tokens(full),
            chars=chars,
        )

    def bind(  # type: ignore[override]  # a kind names the bind options it takes
        self,
        lm: Any,
        inputs: Any,
        target: Any = None,
        ablation: Ablation | None = None,
        output: str | None = None,
        batch_size: int | str | None = None,
        progress: bool = False,
    ) -> TraceBound:
        """The trace's sentences bound to an answer: ``target`` None takes the
        trace's last sentence as the answer and the sentences before it as the
        units; a ``target`` (text or token ids) is the answer read after the whole
        trace, and every sentence is a unit.

        Raises:
            InputError: no sentence left to attribute, or a bad option.

        Example:
            >>> import attrlab as al, torch
            >>> lm = al.zoo.load("reasoning")
            >>> ex = al.zoo.task("reasoning").examples(1)[0]
            >>> b = al.units.Trace().bind(lm, ex.prompt)
            >>> b.n == len(ex.steps) - 1, b.prompt.response.strip() == ex.steps[-1]
            (True, True)
            >>> keep = torch.ones(2, b.n, dtype=torch.bool)
            >>> keep[1, 0] = False                      # drop the first step
            >>> v = b.f(keep)[:, 0]
            >>> bool(v[0] > v[1])                       # the answer needs it
            True
        """
        ablation = self.check_ablation(ablation)
        check_batch_size(batch_size)
        out = check_output(self.output or output or "log_prob")
        view = self.prepare(lm, inputs)
        response = response_of(target)
        if response is None:  # the answer is the last sentence
            if view.n < 2:
                raise InputError(
                    f"the trace has {view.n} sentence(s): with the last one as the answer "
                    "no step is left to attribute; give target='...' (an answer read after "
                    "the trace) to attribute every sentence"
                )
            units = list(range(view.n - 1))
            cut = view.chars[units[-1]][1]
            context, response = view.trace[:cut], view.trace[cut:]
        else:
            units = list(range(view.n))
            context = view.trace
        template = view.prompt.replace("{", "{{").replace("}", "}}") + "{context}"
        prompt = SourcePrompt(
            lm, context, [view.chars[i] for i in units], None, template, False, response
        )
        return TraceBound(self, ablation, view, units, prompt, out, batch_size or "auto", progress)


class TraceBound(SourcesBound):
    """Trace sentences bound to an answer: ``f(keep)`` is the answer's ``output``
    (``[m, 1]``) with only the kept sentences in the trace. Labels are the trace's
    (``sentence``, ``text``, ``start``, ``end``) for the sentences that are units.

    Example:
        >>> import attrlab as al, torch
        >>> lm = al.zoo.load("reasoning")
        >>> b = al.units.Trace().bind(lm, al.zoo.task("reasoning").examples(1)[0].prompt)
        >>> b.labels()["sentence"] == list(range(b.n))
        True
    """

    units: Trace  # type: ignore[assignment]

    def __init__(
        self,
        units: Trace,
        ablation: Ablation | None,
        view: TraceView,
        sentences: list[int],
        prompt: SourcePrompt,
        output: str,
        batch_size: int | str,
        progress: bool,
    ):
        super().__init__(units, ablation, prompt, output, batch_size, progress)  # type: ignore[arg-type]
        self.view = view
        self.sentences = sentences
        self._masks_checked = False  # the model takes 4-D attention masks (Suppress)
        self.target_name = f"answer_{output}({prompt.response!r})"

    def labels(self) -> dict[str, list[Any]]:
        cols = self.view.labels()
        return {k: [v[i] for i in self.sentences] for k, v in cols.items()}

    def _evaluate(self, keep: Tensor) -> Tensor:
        """Per-token log-probabilities of the answer ``[m, n_answer]`` (float64):
        the sentences removed from the text (``Remove``), or kept in the text but
        unread by every later position (``Suppress``)."""
        if isinstance(self.ablation, Suppress):
            return self._suppressed(keep)
        return super()._evaluate(keep)

    def _suppressed(self, keep: Tensor) -> Tensor:
        """The answer's per-token log-probabilities ``[m, n_answer]`` on the full
        trace with the dropped sentences' tokens masked from every later query."""
        from ..model.attention_masks import check_4d_masks, suppression_mask
        from ..model.budget import batch_size_for

        lm, p = self.lm, self.prompt
        head = p.prompt_ids()[0]
        if head != self.view.ids[: len(head)]:
            raise InputError(
                "the trace does not tokenize again to the tokens the model wrote, so its "
                "sentences' positions are unknown: use ablation='remove'"
            )
        resp = list(p.response_ids)
        ids = torch.tensor([head + resp], device=lm.device)
        T, R = ids.shape[1], len(resp)
        spans = [self.view.spans[i] for i in self.sentences]
        if not self._masks_checked:  # once per bound question
            with torch.no_grad():
                base, _ = lm.hf_forward(ids)
            check_4d_masks(lm, ids, base[0], "ablation='suppress'", "Use ablation='remove'")
            self._masks_checked = True
        bs = self.batch_size if isinstance(self.batch_size, int) else None
        rows = batch_size_for(lm, T, cap=64, batch_size=bs)
        target = torch.tensor(resp)
        out = []
        for s in range(0, keep.shape[0], rows):
            chunk = keep[s : s + rows]
            masks = torch.stack(
                [
                    suppression_mask(T, [sp for sp, kept in zip(spans, row) if not kept], lm.dtype)
                    for row in chunk.tolist()
                ]
            )[:, None].to(lm.device)
            with torch.no_grad():
                logits, _ = lm.hf_forward(ids.repeat(len(chunk), 1), attention_mask=masks)
            lp = logits[:, T - R - 1 : T - 1].double().log_softmax(-1).cpu()  # [c, R, vocab]
            out.append(lp.gather(-1, target[None, :, None].expand(len(chunk), R, 1))[..., 0])
            self.stats["forwards"] = self.stats.get("forwards", 0) + 1
            self.stats["n_prompts"] = self.stats.get("n_prompts", 0) + len(chunk)
        return torch.cat(out, 0)

    def meta(self) -> dict[str, Any]:
        return {**self.view.meta(), "answer": self.prompt.response, "output": self.output}
