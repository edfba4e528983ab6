"""Input units: tokens, words, sentences and character spans of a prompt.

Every input unit is a group of token positions of the prepared input (the
prompt, plus a given or generated continuation). Two things are shared by the
gradient and the perturbation methods and live here:

* :class:`EmbedForward` — the target as a function of the token embeddings
  (the output of the ``embed`` site): ``f(emb [n, pos, d_model]) -> [n, rows]``.
  Many embedding tensors (interpolation steps, masks) go through the model in
  one batched forward, fed with an ``Intervention("embed", value, op="set")``.
* ablation by mask (``InputUnits.bind(...).f(keep)``): a dropped unit has the
  embeddings of its tokens replaced by the ablation's embedding (default:
  ``Token("pad")``, the pad token's embedding). Replacing rather than deleting tokens keeps every other
  token at its position, so a mask changes only what it removes, and many masks
  fit in one batch without re-tokenizing.

Tokens that belong to no unit (special tokens with ``exclude_special=True``,
text outside the given spans, the continuation for word/sentence units) are
never ablated and never interpolated: they stay at their real embeddings.

Example:
    >>> import torch, attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> b = al.units.resolve("words").bind(lm, "When Mary and John went",
    ...                                    al.targets.resolve(" to", lm))
    >>> tuple(b.f(torch.tensor([[True] * 5, [False] * 5])).shape)
    (2, 1)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..ablations import Ablation, Counterfactual, Token, Zero
from ..errors import ContextTooLongError, InputError, NonFiniteError, TokenOutOfVocabError
from ..targets import upcast
from .base import Bound, Units, register_units

__all__ = [
    "EmbedForward",
    "InputUnits",
    "InputBound",
    "LMEmbedForward",
    "Sentences",
    "Spans",
    "Tokens",
    "TokenView",
    "Words",
    "make_forward",
]


# --------------------------------------------------------------------------- view
@dataclass
class TokenView:
    """What input units need to know about one prepared input.

    Attributes:
        ids: token ids of the whole prepared input (prompt + continuation), ``[pos]``.
        tokens: each token decoded on its own.
        n_prompt: how many of the positions are the prompt (the rest is continuation).
        special: True for special tokens (BOS, chat-template markers).
        text: the prompt text, when the prompt was given as text.
        offsets: character span of each prompt token in ``text`` (None for
            special tokens or when unknown); length ``n_prompt``.
        segments: optional label of each position (default: ``"prompt"`` /
            ``"continuation"``).
    """

    ids: list[int]
    tokens: list[str]
    n_prompt: int
    special: list[bool]
    text: str | None = None
    offsets: list[tuple[int, int] | None] = field(default_factory=list)
    segments: list[str] | None = None

    @property
    def n_pos(self) -> int:
        return len(self.ids)


def _offsets(tokenizer: Any, text: str, prompt_ids: list[int]) -> list[tuple[int, int] | None]:
    """Character spans of the prompt tokens in ``text``, aligned on the right
    (a prepended BOS has no span)."""
    out: list[tuple[int, int] | None] = [None] * len(prompt_ids)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except Exception:  # slow tokenizers have no offsets
        return out
    ids, offs = list(enc["input_ids"]), list(enc["offset_mapping"])
    n = len(ids)
    if n == 0 or n > len(prompt_ids) or prompt_ids[len(prompt_ids) - n :] != ids:
        return out
    for i, (a, b) in enumerate(offs):
        out[len(prompt_ids) - n + i] = (int(a), int(b))
    return out


def _special_ids(tokenizer: Any) -> set[int]:
    if tokenizer is None:
        return set()
    return {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}


# ----------------------------------------------------------------------- forward
class EmbedForward:
    """The target as a function of the token embeddings of one prepared input.

    Subclasses set ``view`` (:class:`TokenView`), ``n_rows``, ``target_name``
    and implement :meth:`embed_ids` and :meth:`__call__`.
    """

    view: TokenView
    n_rows: int = 1
    target_name: str = ""
    row_labels: dict[str, list[Any]]
    #: id of the pad token (baseline "pad"), and of the mask token if any
    pad_id: int = 0
    mask_id: int | None = None
    #: rows of the token-embedding table (valid ids are ``0 .. vocab_size - 1``)
    vocab_size: int | None = None

    def embed_ids(self, ids: Tensor) -> Tensor:
        """Token embeddings (the ``embed`` site) of ``ids`` ``[pos]`` -> ``[pos, d]``."""
        raise NotImplementedError

    def __call__(self, emb: Tensor) -> Tensor:
        """Target values ``[n, rows]`` for embeddings ``emb`` ``[n, pos, d]``.
        Differentiable when ``emb`` requires grad."""
        raise NotImplementedError

    def rows(self, emb: Tensor) -> list[Tensor]:
        """The target rows as separate tensors ``[n]`` (so that a backward from
        one row need not run through the others' parts of the graph)."""
        v = self(emb)
        return [v[:, r] for r in range(v.shape[1])]

    def logit_positions(self) -> int | None:
        """Positions a forward unembeds per batch row (None: every position);
        the memory estimate of :func:`attrlab.model.budget.row_bytes` counts
        ``vocab`` logits at each."""
        return None

    def points_per_forward(
        self,
        points: int,
        grad: bool = True,
        batch_size: int | None = None,
        memory_budget: int | str | None = None,
    ) -> int:
        """Embedding points per forward when ``points`` go through this forward
        (IG's steps, SmoothGrad's samples): ``batch_size`` if given, else all of
        them in one forward when they fit the memory budget, else the fewest
        forwards that fit, of equal size (:func:`attrlab.model.budget.batch_size_for`
        with ``total=points``, by the expected need of a point: the estimate
        follows the model's depth and width, the sequence length and the logits
        actually unembedded).

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> f = make_forward(lm, "When Mary and John went", " to")
            >>> f.points_per_forward(50), f.points_per_forward(50, memory_budget="2MB")
            (50, 25)
            >>> f.points_per_forward(50, batch_size=7)
            7
        """
        from ..model.budget import batch_size_for

        model = getattr(self, "lm", None) or getattr(self, "wrapper", None)
        return batch_size_for(
            model,
            self.view.n_pos,
            cap=None,
            grad=grad,
            batch_size=batch_size,
            memory_budget=memory_budget,
            logit_positions=self.logit_positions(),
            total=points,
            expected=True,
        )

    def inputs_embeds(self) -> Tensor:
        """The real token embeddings ``[pos, d]``."""
        return self.embed_ids(torch.tensor(self.view.ids, dtype=torch.long))

    def baseline(self, spec: Any = "pad") -> Tensor:
        """A baseline embedding ``[pos, d]``: ``"pad"``, ``"zero"``, ``"mask"``,
        a token id, an integer tensor of token ids ``[pos]`` (e.g. a
        counterfactual prompt), or a float tensor ``[pos, d]`` / ``[1, pos, d]``.

        Raises:
            InputError: unknown name, no mask token, or a tensor of the wrong shape.
            NonFiniteError: a float tensor with NaN or infinite entries.
        """
        x = self.inputs_embeds()
        n = x.shape[0]
        if isinstance(spec, Tensor) and not spec.is_floating_point():
            if spec.dtype == torch.bool or spec.is_complex():
                raise InputError(
                    f"a baseline tensor must hold integer token ids or float embeddings, "
                    f"got dtype {spec.dtype}"
                )
            ids = spec.reshape(-1)
            if ids.numel() != n:
                raise InputError(
                    f"baseline token ids have {ids.numel()} entries; the input has {n} tokens"
                )
            self._check_ids(ids)
            return self.embed_ids(ids.long())
        if isinstance(spec, Tensor):
            b = spec.detach()
            if b.dim() == 3 and b.shape[0] == 1:
                b = b[0]
            if tuple(b.shape) != tuple(x.shape):
                raise InputError(
                    f"baseline has shape {tuple(spec.shape)}; it must be [pos, d_model] = "
                    f"{tuple(x.shape)} (or [1, pos, d_model]) for this input"
                )
            out = b.to(device=x.device, dtype=x.dtype)
            if not bool(torch.isfinite(out).all()):
                raise NonFiniteError(
                    "the baseline tensor has NaN or infinite entries (in the model's dtype); "
                    "give a finite baseline"
                )
            return out
        if isinstance(spec, bool) or spec is None:
            raise InputError(f"cannot read baseline {spec!r}")
        if isinstance(spec, int):
            self._check_ids(torch.tensor([spec]))
            return self.embed_ids(torch.full((n,), spec, dtype=torch.long))
        if spec == "zero":
            return torch.zeros_like(x)
        if spec == "pad":
            return self.embed_ids(torch.full((n,), self.pad_id, dtype=torch.long))
        if spec == "mask":
            if self.mask_id is None:
                raise InputError("this tokenizer has no mask token; use baseline='pad' or 'zero'")
            return self.embed_ids(torch.full((n,), self.mask_id, dtype=torch.long))
        raise InputError(
            f"unknown baseline {spec!r}: use 'pad', 'zero', 'mask', a token id or a tensor"
        )

    def _check_ids(self, ids: Tensor) -> None:
        """Raise :class:`TokenOutOfVocabError` for baseline ids outside the vocabulary."""
        n_vocab = self.vocab_size
        if n_vocab is None:
            return
        bad = ids[(ids < 0) | (ids >= n_vocab)]
        if bad.numel():
            raise TokenOutOfVocabError(
                f"baseline token ids {bad[:5].tolist()} are outside the vocabulary "
                f"(0..{n_vocab - 1}); pass baseline='pad', 'zero', 'mask' or an id in range"
            )

    def evaluate(self, emb: Tensor, batch_size: int = 32) -> Tensor:
        """``self(emb)`` without gradients, in chunks of ``batch_size``: ``[n, rows]``."""
        outs = []
        with torch.no_grad():
            for i in range(0, emb.shape[0], batch_size):
                outs.append(self(emb[i : i + batch_size]).detach())
        return torch.cat(outs, 0)


def generate_greedy(lm: Any, ids: list[int], n: int) -> list[int]:
    """``n`` greedy next tokens after ``ids`` (one forward per token).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> len(generate_greedy(lm, lm.encode("a b"), 3))
        3
    """
    out: list[int] = []
    cur = list(ids)
    n_ctx = lm.cfg.n_ctx
    if n_ctx is not None and len(cur) + n > n_ctx:
        raise ContextTooLongError(
            f"prompt ({len(cur)} tokens) + max_new_tokens ({n}) exceeds this model's "
            f"context of {n_ctx} tokens"
        )
    for _ in range(n):
        logits, _ = lm.run(torch.tensor([cur]), last_only=True)
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        cur.append(nxt)
    return out


class LMEmbedForward(EmbedForward):
    """:class:`EmbedForward` of a causal LM (:class:`attrlab.LM`) and a target.

    Next-token targets give one row; ``ContinuationLogProb(..., reduce="none")``
    gives one row per continuation token. With ``max_new_tokens`` and no target
    (or the top-token default) the continuation is generated greedily first.
    """

    def __init__(
        self,
        lm: Any,
        inputs: Any,
        target: Any = None,
        max_new_tokens: int | None = None,
        prepend_bos: bool | None = None,
    ):
        from ..targets import ContinuationLogProb, TopToken
        from ..targets import resolve as resolve_target

        self.lm = lm
        batch = lm.tokenize(inputs, prepend_bos)
        if batch.shape[0] != 1:
            raise InputError(
                f"input attribution explains one prompt at a time; got {batch.shape[0]}. "
                "Loop over prompts."
            )
        prompt_ids = batch.input_ids[0].tolist()
        if max_new_tokens and (target is None or isinstance(target, TopToken)):
            gen = generate_greedy(lm, prompt_ids, int(max_new_tokens))
            target = ContinuationLogProb(gen, reduce="none")
        tgt = resolve_target(target, lm)
        full = tgt.prepare(lm, batch)
        n_ctx = lm.cfg.n_ctx
        if n_ctx is not None and full.shape[1] > n_ctx:
            raise ContextTooLongError(
                f"prompt + continuation is {full.shape[1]} tokens; this model's context is {n_ctx}"
            )
        self.target = tgt
        self.batch = full
        self.target_name = tgt.describe()
        ids = full.input_ids[0].tolist()
        tok = lm.tokenizer
        specials = _special_ids(tok)
        tokens = lm.to_str_tokens(ids) if tok is not None else [str(i) for i in ids]
        text = inputs if isinstance(inputs, str) else None
        if isinstance(inputs, (list, tuple)) and len(inputs) == 1 and isinstance(inputs[0], str):
            text = inputs[0]
        offsets = _offsets(tok, text, prompt_ids) if (text is not None and tok is not None) else []
        self.view = TokenView(
            ids=ids,
            tokens=tokens,
            n_prompt=len(prompt_ids),
            special=[i in specials for i in ids],
            text=text,
            offsets=offsets or [None] * len(prompt_ids),
        )
        self.next_token = bool(getattr(tgt, "next_token", True))
        with torch.no_grad():
            probe = self(self.inputs_embeds()[None])
        self.n_rows = int(probe.shape[1])
        cont = ids[len(prompt_ids) :]
        self.row_labels = {}
        if self.n_rows > 1 and len(cont) == self.n_rows:
            self.row_labels = {
                "position": list(range(len(prompt_ids), len(ids))),
                "token": tokens[len(prompt_ids) :],
            }
        self.pad_id = lm.pad_token_id
        self.mask_id = getattr(tok, "mask_token_id", None) if tok is not None else None
        self.vocab_size = lm.cfg.d_vocab

    def embed_ids(self, ids: Tensor) -> Tensor:
        return self.lm.embed_ids(ids)

    def logit_positions(self) -> int | None:
        if self.next_token:
            return 1
        # a continuation read row by row unembeds one position per row
        return self.n_rows if self._per_token_path() else None

    def __call__(self, emb: Tensor) -> Tensor:
        from ..model.interventions import Intervention

        if self._per_token_path():
            return torch.stack(self.rows(emb), 1)
        n = emb.shape[0]
        b = self.batch.repeat(n)
        logits, _ = self.lm.run(
            b,
            interventions=[Intervention("embed", emb)],
            grad=emb.requires_grad,
            last_only=self.next_token,
        )
        v = self.target(logits, b)
        return v.reshape(n, -1)

    def _per_token_path(self) -> bool:
        from ..targets import ContinuationLogProb

        return type(self.target) is ContinuationLogProb

    def rows(self, emb: Tensor) -> list[Tensor]:
        """Each row's values ``[n]``, each with its own graph after the shared blocks.

        For a continuation, the blocks run once (the model's logits only at the
        last position); each continuation token's log-probability is then read
        from the cached input of the final norm through the model's own final
        norm and unembedding at that one position. A backward from one row then
        touches one position of the unembedding instead of ``pos x vocab``
        logits. The last continuation token predicts nothing that is asked
        for, so it is left out of the forward (its gradient is exactly 0). (Tried and dropped: an incremental key/value-cache forward, so
        that row ``r``'s graph only spans ``prompt + r`` positions — its
        one-token steps are memory-bound and it was slower; and a vmap-batched
        backward over the rows — also slower on CPU.)
        """
        if not self._per_token_path():
            return super().rows(emb)
        return self._final_norm_rows(emb)

    def _final_norm_rows(self, emb: Tensor) -> list[Tensor]:
        from ..model.interventions import Intervention
        from ..model.wrapper import Batch

        n = emb.shape[0]
        b = self.batch.repeat(n)
        # the last token is read by no row (causal model): run the others only
        b = Batch(b.input_ids[:, :-1], b.attention_mask[:, :-1], b.position_ids[:, :-1])
        _, cache = self.lm.run(
            b,
            cache=["final_norm.input"],
            interventions=[Intervention("embed", emb[:, :-1])],
            grad=emb.requires_grad,
            last_only=True,
        )
        h = cache["final_norm.input"]  # [n, pos - 1, d]
        tgt: Any = self.target  # a ContinuationLogProb
        ids = tgt.ids
        assert ids is not None
        k, width = len(ids), h.shape[1]
        per_token = []
        for r, tid in enumerate(ids):
            pos = width - k + r  # predicts continuation token r
            logits = self.lm.unembed(self.lm.apply_final_norm(h[:, pos]))  # [n, vocab]
            per_token.append(upcast(logits).log_softmax(-1)[:, tid])
        reduce = tgt.reduce
        if reduce == "none":
            return per_token
        total = torch.stack(per_token, 0).sum(0)
        return [total if reduce == "sum" else total / k]


class WrapperForward(EmbedForward):
    """:class:`EmbedForward` of a wrapper that is not a causal LM (a classifier, a
    sentence encoder), built from the plain description of one input its
    ``embedding_input(inputs)`` returns (:class:`attrlab.model.classifier.EmbeddingInput`):
    the target is read from ``wrapper.run(batch, embeddings=...)``'s logits, or is
    the wrapper's own ``value`` (an encoder's similarity; then ``target`` must be None).
    """

    def __init__(self, wrapper: Any, inputs: Any, target: Any = None):
        from ..targets import Target, TopToken
        from ..targets import resolve as resolve_target

        inp = wrapper.embedding_input(inputs)
        self.wrapper, self.inp = wrapper, inp
        self.view = TokenView(
            list(inp.ids),
            list(inp.tokens),
            len(inp.ids),
            list(inp.special),
            inp.text,
            list(inp.offsets),
            inp.segments,
        )
        self.n_rows = 1
        self.row_labels = {}
        self.pad_id, self.mask_id, self.vocab_size = inp.pad_id, inp.mask_id, inp.vocab_size
        if inp.value is not None:  # the wrapper's own target
            if target is not None and not isinstance(target, TopToken):
                raise InputError(
                    f"{type(wrapper).__name__} attributes its own target ({inp.value_name}); "
                    "pass target=None"
                )
            self.target = None
            self.target_name = inp.value_name
            return
        if isinstance(target, Target) and not getattr(target, "next_token", True):
            raise InputError("a classifier has no continuation: use a class index target")
        self.target = resolve_target(target, wrapper)
        self.target.prepare(wrapper, inp.batch)
        self.target_name = self.target.describe()

    def embed_ids(self, ids: Tensor) -> Tensor:
        assert self.inp.embed_ids is not None
        return self.inp.embed_ids(ids)

    def __call__(self, emb: Tensor) -> Tensor:
        n = emb.shape[0]
        if self.inp.value is not None:
            return self.inp.value(emb).reshape(n, 1)
        b = self.inp.batch.repeat(n)
        logits, _ = self.wrapper.run(b, grad=emb.requires_grad, embeddings=emb)
        assert self.target is not None  # set whenever the wrapper has no value of its own
        return self.target(logits, b).reshape(n, -1)


def make_forward(lm: Any, inputs: Any, target: Any = None, **options: Any) -> EmbedForward:
    """The :class:`EmbedForward` for a model: a :class:`WrapperForward` when the
    wrapper describes its inputs itself (``embedding_input``: classifiers,
    encoders), else :class:`LMEmbedForward`.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> f = make_forward(lm, "When Mary and John went", " to")
        >>> tuple(f(f.inputs_embeds()[None]).shape)
        (1, 1)
    """
    if isinstance(inputs, EmbedForward):
        return inputs
    if hasattr(lm, "embedding_input"):
        return WrapperForward(lm, inputs, target)
    allowed = {k: v for k, v in options.items() if k in ("max_new_tokens", "prepend_bos")}
    return LMEmbedForward(lm, inputs, target, **allowed)


# ------------------------------------------------------------------------- units
class InputUnits(Units):
    """Base class of input unit kinds: a unit is a group of token positions."""

    def groups(self, view: TokenView) -> tuple[list[list[int]], dict[str, list[Any]]]:
        """``(positions of each unit, label columns)`` for a prepared input."""
        raise NotImplementedError

    def position_mask(self, view: TokenView) -> Tensor:
        """``[pos]`` bool: positions that belong to some unit."""
        groups, _ = self.groups(view)
        m = torch.zeros(view.n_pos, dtype=torch.bool)
        for g in groups:
            m[g] = True
        return m

    @staticmethod
    def expand_masks(masks: Tensor, groups: list[list[int]], n_pos: int) -> Tensor:
        """Unit masks ``[n_masks, n_units]`` -> position keep-masks ``[n_masks, pos]``
        (positions outside every unit are kept)."""
        masks = torch.as_tensor(masks, dtype=torch.bool)
        if masks.dim() != 2 or masks.shape[1] != len(groups):
            raise InputError(
                f"masks must be [n_masks, n_units={len(groups)}], got {tuple(masks.shape)}"
            )
        keep = torch.ones(masks.shape[0], n_pos, dtype=torch.bool)
        for u, g in enumerate(groups):
            keep[:, g] = masks[:, u : u + 1].expand(-1, len(g))
        return keep

    provides = frozenset({"f", "gates"})
    ablations = (Token, Zero, Counterfactual)

    def bind(
        self,
        lm: Any,
        inputs: Any,
        target: Any,
        ablation: Ablation | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        memory_budget: int | str | None = None,
        grad: bool = False,
        **options: Any,
    ) -> InputBound:
        """The bound question: ``f`` / ``f_gated`` over this kind's units.

        ``inputs`` may also be a ready :class:`EmbedForward` (then ``target`` is
        ignored); ``options`` go to :func:`make_forward` (``max_new_tokens`` …).

        Example:
            >>> import attrlab as al, torch
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> b = al.units.Tokens().bind(lm, "a b c", al.targets.resolve(" a", lm))
            >>> tuple(b.f(torch.ones(2, b.n, dtype=torch.bool)).shape)
            (2, 1)
        """
        fwd = make_forward(lm, inputs, target, **options)
        from ..model.budget import batch_size_for

        # masked inputs per forward: batch_size, or as many (at most 32) as fit the budget
        bs = batch_size_for(
            getattr(fwd, "lm", None),
            fwd.view.n_pos,
            cap=32,
            grad=grad,
            batch_size=batch_size,
            memory_budget=memory_budget,
            logit_positions=fwd.logit_positions(),
        )
        b = InputBound(self, lm, fwd, self.check_ablation(ablation), bs)
        # gradient points per forward: chosen per call from the number of points
        # (EmbedForward.points_per_forward), unless the user forced batch_size
        b.grad_batch_size, b.memory_budget, b.progress = batch_size, memory_budget, progress
        return b


class InputBound(Bound):
    """Input units bound to a question: a unit's positions get the ablated
    embedding (a token's, zero, or the counterfactual prompt's)."""

    def __init__(
        self,
        units: InputUnits,
        lm: Any,
        fwd: EmbedForward,
        ablation: Ablation | None,
        batch_size: int | None = None,
    ):
        self.units, self.lm, self.fwd, self.ablation = units, lm, fwd, ablation
        self.grad_batch_size: int | None = None  # gradient points per forward (None: auto)
        self.memory_budget: int | str | None = None
        self.progress = False
        self.groups, self._labels = units.groups(fwd.view)
        self.n, self.n_rows = len(self.groups), fwd.n_rows
        self.target_name = fwd.target_name
        self.batch_size = batch_size or 32
        self.x = fwd.inputs_embeds()  # [pos, d]
        self.x0 = fwd.baseline(self._baseline_spec())  # [pos, d]
        self._pos_of = torch.zeros(fwd.view.n_pos, dtype=torch.long)  # position -> unit + 1
        for u, g in enumerate(self.groups):
            self._pos_of[g] = u + 1

    def _baseline_spec(self) -> Any:
        a = self.ablation
        if isinstance(a, Token):
            return a.token
        if isinstance(a, Tensor):  # transitional: a raw baseline tensor
            return a
        if isinstance(a, Zero):
            return "zero"
        if isinstance(a, Counterfactual):
            ids = self.lm.tokenize(a.inputs).input_ids[0] if hasattr(self.lm, "tokenize") else None
            if isinstance(a.inputs, Tensor):
                ids = a.inputs.reshape(-1)
            if ids is None or ids.numel() > self.fwd.view.n_pos:
                raise InputError("the counterfactual prompt must have the prompt's token length")
            full = torch.tensor(self.fwd.view.ids, dtype=torch.long)
            full[: ids.numel()] = ids.cpu()  # the continuation (if any) stays
            if ids.numel() != self.fwd.view.n_prompt:
                from ..errors import CounterfactualLengthError

                raise CounterfactualLengthError(
                    f"the counterfactual has {ids.numel()} tokens, the prompt "
                    f"{self.fwd.view.n_prompt}; give one of the same token length"
                )
            return full
        return "pad"

    def labels(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in self._labels.items()}

    def meta(self) -> dict[str, Any]:
        v = self.fwd.view
        return {"prompt": v.text, "tokens": v.tokens, "ids": v.ids, "n_prompt": v.n_prompt}

    def row_labels(self) -> dict[str, list[Any]]:
        return dict(self.fwd.row_labels)

    def _position_gates(self, g: Tensor) -> Tensor:
        """Unit gates ``[m, n]`` -> position gates ``[m, pos]`` (1 outside every unit)."""
        ones = torch.ones(g.shape[0], 1, dtype=g.dtype, device=g.device)
        return torch.cat([ones, g], 1)[:, self._pos_of]

    def f(self, keep: Tensor) -> Tensor:
        keep_pos = self._position_gates(self.check_keep(keep).float()) > 0.5  # [m, pos]
        emb = torch.where(keep_pos[..., None].to(self.x.device), self.x[None], self.x0[None])
        return self.fwd.evaluate(emb, self.batch_size)  # [m, rows]

    def f_gated(self, g: Tensor) -> Tensor:
        gp = self._position_gates(self.check_gates(g)).to(self.x.device, self.x.dtype)
        emb = gp[..., None] * self.x[None] + (1 - gp[..., None]) * self.x0[None]  # [m, pos, d]
        return self.fwd(emb)

    def gate_grad_sum(self, g: Tensor, weights: Tensor, chunk: int = 32) -> tuple[Tensor, Tensor]:
        """The fast path: gradients at the token embeddings
        (:func:`attrlab.units.token_grads.grad_products`), ``d f / d g_u =
        sum over u's positions of (x - x0) . df/dx`` (tested against autograd)."""
        from .token_grads import grad_products

        gp = self._position_gates(self.check_gates(g)).to(self.x.device, self.x.dtype)
        delta = self.x - self.x0  # [pos, d]
        points = self.x0[None] + gp[..., None] * delta[None]  # [k, pos, d]
        w = weights.to(self.x.device, self.x.dtype)[:, None, None]
        bs = self.fwd.points_per_forward(
            points.shape[0], True, self.grad_batch_size, self.memory_budget
        )
        acc, vals = grad_products(self.fwd, points, w * delta[None], bs, self.progress)
        per_pos = acc.sum(-1)  # [rows, pos]
        scores = torch.stack([per_pos[:, grp].sum(-1) for grp in self.groups], -1)
        return scores, vals


def _labels_for_positions(view: TokenView, groups: list[list[int]]) -> dict[str, list[Any]]:
    return {
        "position": [g[0] if g else -1 for g in groups],
        "token": ["".join(view.tokens[p] for p in g) for g in groups],
    }


@register_units("tokens")
class Tokens(InputUnits):
    """One unit per token.

    Args:
        exclude_special: leave special tokens (BOS, chat markers) out of the units
            (they are then never ablated); by default they are units, labeled
            ``special=True``.
        include_generated: whether continuation tokens (given or generated) are
            units too, so that each continuation row is attributed to the prompt
            and the earlier continuation tokens. With False only the prompt is
            attributed and the continuation stays fixed (Captum's convention).

    Example:
        >>> import attrlab as al
        >>> al.units.resolve("tokens").kind
        'tokens'
    """

    def __init__(self, exclude_special: bool = False, include_generated: bool = True):
        self.exclude_special = exclude_special
        self.include_generated = include_generated

    def groups(self, view: TokenView) -> tuple[list[list[int]], dict[str, list[Any]]]:
        last = view.n_pos if self.include_generated else view.n_prompt
        pos = [p for p in range(last) if not (self.exclude_special and view.special[p])]
        groups = [[p] for p in pos]
        labels = _labels_for_positions(view, groups)
        labels["special"] = [view.special[p] for p in pos]
        seg = view.segments or [
            "prompt" if p < view.n_prompt else "continuation" for p in range(view.n_pos)
        ]
        labels["segment"] = [seg[p] for p in pos]
        return groups, labels


def _require_text(view: TokenView, kind: str) -> str:
    if view.text is None or all(o is None for o in view.offsets):
        raise InputError(
            f"units={kind!r} need the prompt as text with a fast tokenizer (character offsets); "
            "use units='tokens' for token ids"
        )
    return view.text


def _tokens_in_spans(view: TokenView, spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Prompt token positions whose (stripped) character span overlaps each span
    (a whitespace-only token counts with the next non-space character)."""
    text = view.text or ""
    groups: list[list[int]] = [[] for _ in spans]
    for p, off in enumerate(view.offsets):
        if off is None or view.special[p]:
            continue
        a, b = off
        while a < b and text[a].isspace():  # " Mary" belongs to the word Mary
            a += 1
        if a >= b:  # a whitespace-only token goes with the next word
            m = re.compile(r"\S").search(text, off[1])
            a, b = (m.start(), m.start() + 1) if m else off
        for u, (s, e) in enumerate(spans):
            if a < e and s < b:
                groups[u].append(p)
                break
    return groups


class _TextUnits(InputUnits):
    def spans(self, text: str) -> list[tuple[int, int]]:
        raise NotImplementedError

    def groups(self, view: TokenView) -> tuple[list[list[int]], dict[str, list[Any]]]:
        text = _require_text(view, self.kind)
        spans = self.spans(text)
        groups = _tokens_in_spans(view, spans)
        keep = [i for i, g in enumerate(groups) if g]
        return [groups[i] for i in keep], {
            "text": [text[spans[i][0] : spans[i][1]] for i in keep],
            "start": [spans[i][0] for i in keep],
            "end": [spans[i][1] for i in keep],
            "position": [groups[i][0] for i in keep],
        }


@register_units("words")
class Words(_TextUnits):
    """One unit per word of the prompt (maximal runs of non-space characters,
    or of word characters with ``split_punct=True``).

    Example:
        >>> Words().spans("Hi there, Bob")
        [(0, 2), (3, 9), (10, 13)]
    """

    def __init__(self, split_punct: bool = False):
        self.split_punct = split_punct

    def spans(self, text: str) -> list[tuple[int, int]]:
        pat = r"\w+|[^\w\s]" if self.split_punct else r"\S+"
        return [(m.start(), m.end()) for m in re.finditer(pat, text)]


@register_units("sentences")
class Sentences(_TextUnits):
    """One unit per sentence of the prompt (split after ``.``, ``!``, ``?`` or a newline).

    Example:
        >>> Sentences().spans("It rains. We stay in!")
        [(0, 9), (10, 21)]
    """

    def spans(self, text: str) -> list[tuple[int, int]]:
        out = []
        for m in re.finditer(r"[^.!?\n]*(?:[.!?]+|\n|$)", text):
            a, b = m.start(), m.end()
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            if b > a:
                out.append((a, b))
        return out


@register_units("spans")
class Spans(_TextUnits):
    """User-given character spans ``[(start, end), ...]`` of the prompt text;
    ``units=[(0, 5), (6, 10)]`` builds this kind.

    Example:
        >>> Spans([(0, 4), (5, 9)]).spans("When Mary went")
        [(0, 4), (5, 9)]
    """

    def __init__(self, spans: Sequence[Sequence[int]] = ()):
        self.spans_list = [(int(a), int(b)) for a, b in spans]
        for a, b in self.spans_list:
            if not 0 <= a < b:
                raise InputError(f"bad span ({a}, {b}): need 0 <= start < end")

    def params(self) -> dict[str, Any]:
        return {"spans": [list(s) for s in self.spans_list]}

    def spans(self, text: str) -> list[tuple[int, int]]:
        for a, b in self.spans_list:
            if b > len(text):
                raise InputError(f"span ({a}, {b}) is past the end of the text ({len(text)} chars)")
        return list(self.spans_list)

    def groups(self, view: TokenView) -> tuple[list[list[int]], dict[str, list[Any]]]:
        groups, labels = super().groups(view)
        if len(groups) != len(self.spans_list):
            raise InputError("a span covers no token of the prompt; check the character offsets")
        return groups, labels


# ------------------------------------------------------------------------ result
def input_result(
    lm: Any,
    fwd: EmbedForward,
    units: InputUnits,
    scores: Tensor,
    method: Any,
    diagnostics: dict[str, Any] | None = None,
    extra: dict[str, Tensor] | None = None,
) -> Any:
    """An :class:`attrlab.Attribution` for input units: ``scores`` is ``[rows, n_units]``
    (squeezed to ``[n_units]`` for a single-row target).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "When Mary and John went", target=" to", method="occlusion")
        >>> r.meta["units_params"]
        {'exclude_special': False, 'include_generated': True}
    """
    from ..result import Attribution

    _, labels = units.groups(fwd.view)
    s = scores[0] if scores.shape[0] == 1 else scores
    return Attribution(
        s.detach().double().cpu() if s.dtype == torch.float64 else s.detach().float().cpu(),
        units=labels,
        unit_kind=units.kind,
        method=method.name,
        target=fwd.target_name,
        params=method.params(),
        model_id=str(getattr(lm, "name", "")),
        diagnostics=diagnostics or {},
        rows=fwd.row_labels if s.dim() == 2 else {},
        meta={
            "prompt": fwd.view.text,
            "tokens": fwd.view.tokens,
            "ids": fwd.view.ids,
            "n_prompt": fwd.view.n_prompt,
            "units_params": units.params(),
        },
        extra=extra,
    )
