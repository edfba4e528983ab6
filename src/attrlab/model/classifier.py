"""Thin wrappers for models that are not causal LMs: sequence classifiers
(``AutoModelForSequenceClassification``, encoder or decoder) and sentence
encoders (mean-pooled, for the cosine similarity of two sentences).

They need no adapter: input attribution only touches the token embeddings, via
the generic Hugging Face ``model.get_input_embeddings()``; the embedding
module's output is replaced by a forward hook during a run. They implement the
small part of :class:`attrlab.LM` that input attribution uses (``tokenize``,
``run``, ``token_id``, ``embed_ids``) and describe one input as plain data
(:meth:`Classifier.embedding_input`, an :class:`EmbeddingInput`); the input unit
kinds (:func:`attrlab.units.tokens.make_forward`) build their target-of-
embeddings function from it. So :func:`attrlab.attribute` with
``units="tokens" | "words" | "sentences" | spans`` and the gradient and
perturbation methods work on them, and so do :mod:`attrlab.evaluate`'s LDS,
curves and randomization check. This module knows no unit kind and no target.

Targets: a class index (its logit), ``al.targets.LogProb(i)`` / ``Prob(i)``,
a pair ``(i, j)`` for a logit difference, or None for the predicted class.

Example:
    >>> import torch, attrlab as al
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from attrlab.model.classifier import Classifier
    >>> tok = al.testing.tiny_tokenizer()
    >>> cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
    ...                  num_attention_heads=2, intermediate_size=32, num_labels=3)
    >>> clf = Classifier(BertForSequenceClassification(cfg).eval(), tok)
    >>> r = al.attribute(clf, "It was sunny and warm", target=2, method="ig", steps=8)
    >>> len(r) == len(tok("It was sunny and warm")["input_ids"])
    True
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ContextTooLongError, EmptyPromptError, InputError, TokenOutOfVocabError
from .lock import model_lock

__all__ = ["Classifier", "EmbeddingInput", "Encoder", "SequenceBatch"]


@dataclass
class SequenceBatch:
    """Tokenized classifier inputs (``[batch, pos]`` tensors; ``token_type_ids`` optional)."""

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def repeat(self, n: int) -> SequenceBatch:
        """Each row repeated ``n`` times consecutively."""
        tt = self.token_type_ids
        return SequenceBatch(
            self.input_ids.repeat_interleave(n, 0),
            self.attention_mask.repeat_interleave(n, 0),
            None if tt is None else tt.repeat_interleave(n, 0),
        )

    def kwargs(self) -> dict[str, Tensor]:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out


@dataclass
class EmbeddingInput:
    """One input of a classifier or encoder as input attribution sees it: its tokens
    (plain data) and the model as a function of their embeddings. Built by the
    wrapper's ``embedding_input``; :func:`attrlab.units.tokens.make_forward` turns it
    (and a target) into the units' ``EmbedForward``.

    Attributes:
        ids, tokens, special: per position, the token id, its text, and whether it
            is a special token.
        text: the text (a pair of texts joined by a newline).
        offsets: character span of each token in ``text`` (None for special tokens).
        segments: optional label of each position (``"a"`` / ``"b"`` for a pair).
        embed_ids: token ids ``[pos]`` -> embeddings ``[pos, d]``.
        pad_id, mask_id, vocab_size: for baselines.
        batch: the tokenized input (one row) when the target is read from
            :meth:`Classifier.run`'s logits; None when the wrapper has its own target.
        value: the wrapper's own target (an :class:`Encoder`'s similarity) as a function
            of the embeddings ``[n, pos, d]`` -> ``[n, 1]``, else None.
        value_name: its description.

    Example:
        >>> import torch
        >>> e = EmbeddingInput([5, 6], ["a", "b"], [False, False], "a b", [(0, 1), (2, 3)])
        >>> e.n_pos
        2
    """

    ids: list[int]
    tokens: list[str]
    special: list[bool]
    text: str | None
    offsets: list[tuple[int, int] | None]
    segments: list[str] | None = None
    embed_ids: Callable[[Tensor], Tensor] | None = None
    pad_id: int = 0
    mask_id: int | None = None
    vocab_size: int | None = None
    batch: SequenceBatch | None = None
    value: Callable[[Tensor], Tensor] | None = None
    value_name: str = ""

    @property
    def n_pos(self) -> int:
        return len(self.ids)


@contextlib.contextmanager
def replace_embeddings(model: Any, emb: Tensor | None) -> Iterator[None]:
    """Within the block, the token-embedding module of ``model`` returns ``emb``."""
    if emb is None:
        yield
        return
    module = model.get_input_embeddings()

    def hook(mod: nn.Module, args: Any, out: Tensor) -> Tensor:
        if tuple(out.shape) != tuple(emb.shape):
            raise InputError(f"embeddings {tuple(emb.shape)} do not fit {tuple(out.shape)}")
        return emb.to(out.dtype)

    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


class _Wrapper:
    """What :class:`Classifier` and :class:`Encoder` share."""

    #: :func:`attrlab.attribute` accepts objects with this flag besides :class:`attrlab.LM`
    attrlab_wrapper = True

    def __init__(self, model: nn.Module, tokenizer: Any, name: str | None = None):
        if not hasattr(model, "get_input_embeddings"):
            raise InputError("the model must provide get_input_embeddings() (a Hugging Face model)")
        self.model: Any = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.n_ctx: int | None = getattr(model.config, "max_position_embeddings", None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def lock(self) -> threading.RLock:
        """The model's re-entrant lock (:mod:`attrlab.model.lock`), held by runs."""
        return model_lock(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def pad_token_id(self) -> int:
        v = getattr(self.tokenizer, "pad_token_id", None)
        return int(v) if v is not None else 0

    def with_model(self, model: nn.Module) -> Any:
        """The same wrapper around another model (e.g. a randomized copy)."""
        return type(self)(model, self.tokenizer, name=f"{self.name} (copy)")

    def _encode(self, text: str | Sequence[str]) -> Any:
        if isinstance(text, str):
            if text == "":
                raise EmptyPromptError("the input text is empty")
            enc = self.tokenizer(text, return_offsets_mapping=True)
        elif (
            isinstance(text, (tuple, list))
            and len(text) == 2
            and all(isinstance(t, str) and t for t in text)
        ):
            enc = self.tokenizer(text[0], text[1], return_offsets_mapping=True)
        else:
            raise InputError("inputs must be a text or a pair of texts")
        n = len(enc["input_ids"])
        if self.n_ctx is not None and n > self.n_ctx:
            raise ContextTooLongError(
                f"the input has {n} tokens; this model's context is {self.n_ctx}"
            )
        return enc

    def embed_ids(self, ids: Tensor) -> Tensor:
        """Token embeddings ``[pos, d]`` of ids ``[pos]``."""
        with torch.no_grad():
            return self.model.get_input_embeddings()(ids.to(self.device)[None])[0].detach()


def _view(wrapper: _Wrapper, enc: Any, text: str | Sequence[str]) -> EmbeddingInput:
    """The :class:`EmbeddingInput` of one encoding (its tokens; no forward yet);
    a pair of texts is joined by a newline."""
    ids = [int(i) for i in enc["input_ids"]]
    tok = wrapper.tokenizer
    special_ids = {int(i) for i in (getattr(tok, "all_special_ids", None) or [])}
    special = [i in special_ids for i in ids]
    offsets: list[tuple[int, int] | None] = []
    seq_ids = enc.sequence_ids() if hasattr(enc, "sequence_ids") else [0] * len(ids)
    first = text if isinstance(text, str) else text[0]
    joined = text if isinstance(text, str) else f"{text[0]}\n{text[1]}"
    for (a, b), s, sp in zip(enc["offset_mapping"], seq_ids, special):
        if sp or s is None or a == b:
            offsets.append(None)
        else:
            shift = 0 if s == 0 else len(first) + 1
            offsets.append((int(a) + shift, int(b) + shift))
    tokens = [str(t) for t in tok.convert_ids_to_tokens(ids)]
    return EmbeddingInput(
        ids,
        tokens,
        special,
        joined,
        offsets,
        embed_ids=wrapper.embed_ids,
        pad_id=wrapper.pad_token_id,
        mask_id=getattr(tok, "mask_token_id", None),
        vocab_size=int(wrapper.model.get_input_embeddings().weight.shape[0]),
    )


class Classifier(_Wrapper):
    """A Hugging Face sequence classifier (encoder or decoder) for input attribution.

    Args:
        model: e.g. ``AutoModelForSequenceClassification.from_pretrained(...)``.
        tokenizer: its tokenizer (a fast one, for word/sentence units).

    Example:
        >>> import attrlab as al
        >>> from transformers import GPT2Config, GPT2ForSequenceClassification
        >>> from attrlab.model.classifier import Classifier
        >>> tok = al.testing.tiny_tokenizer()
        >>> cfg = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2,
        ...                  num_labels=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
        >>> clf = Classifier(GPT2ForSequenceClassification(cfg), tok)
        >>> r = al.attribute(clf, "It was sunny", target=1, units="words", method="occlusion")
        >>> r.units["text"]
        ['It', 'was', 'sunny']
    """

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    def token_id(self, label: str | int) -> int:
        """The class index of ``label`` (an index, or a name from ``config.label2id``).

        Raises:
            TokenOutOfVocabError: no such class.
        """
        if isinstance(label, str):
            l2i = getattr(self.model.config, "label2id", {}) or {}
            if label not in l2i:
                raise TokenOutOfVocabError(
                    f"unknown class {label!r}; classes are {sorted(l2i)} or 0..{self.num_labels - 1}"
                )
            return int(l2i[label])
        i = int(label)
        if not 0 <= i < self.num_labels:
            raise TokenOutOfVocabError(
                f"class index {i} is out of range; the model has {self.num_labels} classes "
                f"(0..{self.num_labels - 1})"
            )
        return i

    def to_str_tokens(self, ids: Tensor | Sequence[int]) -> list[str]:
        """Class names of class indices (used by the top-class target)."""
        i2l = getattr(self.model.config, "id2label", {}) or {}
        vals = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [str(i2l.get(int(i), int(i))) for i in vals]

    def tokenize(self, inputs: Any, prepend_bos: bool | None = None) -> SequenceBatch:
        """One text (or a pair of texts) as a :class:`SequenceBatch` of one row."""
        if isinstance(inputs, SequenceBatch):
            return inputs
        enc = self._encode(inputs)
        ids = torch.tensor([enc["input_ids"]], device=self.device)
        tt = enc.get("token_type_ids")
        return SequenceBatch(
            ids,
            torch.ones_like(ids),
            None if tt is None else torch.tensor([tt], device=self.device),
        )

    def run(
        self,
        inputs: Any,
        interventions: Any = None,
        *,
        grad: bool = False,
        last_only: bool = False,
        embeddings: Tensor | None = None,
        **_: Any,
    ) -> tuple[Tensor, dict]:
        """Class logits as ``[batch, 1, n_classes]`` (so next-token targets apply)."""
        if interventions:
            raise InputError("classifier wrappers take embeddings=, not interventions")
        batch = self.tokenize(inputs)
        with self.lock, torch.set_grad_enabled(grad), replace_embeddings(self.model, embeddings):
            out = self.model(**batch.kwargs())
        return out.logits[:, None, :], {}

    def embedding_input(self, inputs: Any) -> EmbeddingInput:
        """One text (or a pair of texts) as an :class:`EmbeddingInput`; the class
        target is read from :meth:`run`'s logits with ``embeddings=``.

        Example:
            >>> import attrlab as al
            >>> from transformers import BertConfig, BertForSequenceClassification
            >>> tok = al.testing.tiny_tokenizer()
            >>> cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
            ...                  num_attention_heads=2, intermediate_size=32, num_labels=3)
            >>> e = Classifier(BertForSequenceClassification(cfg), tok).embedding_input("It was")
            >>> e.tokens, e.batch.input_ids.shape[1] == e.n_pos
            (['It', 'Ġwas'], True)
        """
        out = _view(self, self._encode(inputs), inputs)
        out.batch = self.tokenize(inputs)
        return out


class Encoder(_Wrapper):
    """A sentence encoder (e.g. all-MiniLM-L6-v2 via ``AutoModel``), mean-pooled
    over real tokens. ``al.attribute(enc, (a, b), method="ig")`` attributes the
    cosine similarity of the two sentences' embeddings to the tokens of both
    (units are the tokens of ``a`` then of ``b``; words/sentences work too).

    Example:
        >>> import attrlab as al
        >>> from transformers import BertConfig, BertModel
        >>> from attrlab.model.classifier import Encoder
        >>> tok = al.testing.tiny_tokenizer()
        >>> cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
        ...                  num_attention_heads=2, intermediate_size=32)
        >>> enc = Encoder(BertModel(cfg).eval(), tok)
        >>> r = al.attribute(enc, ("It was sunny", "It was warm"), method="ig", steps=16)
        >>> r.units["segment"][0], r.units["segment"][-1]
        ('a', 'b')
    """

    def tokenize(self, inputs: Any, prepend_bos: bool | None = None) -> SequenceBatch:
        """One text as a :class:`SequenceBatch` of one row."""
        enc = self._encode(inputs)
        ids = torch.tensor([enc["input_ids"]], device=self.device)
        return SequenceBatch(ids, torch.ones_like(ids))

    def token_id(self, label: Any) -> int:
        raise InputError("an Encoder's target is the similarity of two texts; pass target=None")

    def encode(
        self, texts: str | Sequence[str], embeddings: Tensor | None = None, grad: bool = False
    ) -> Tensor:
        """Mean-pooled sentence embeddings ``[n, d]`` (``embeddings`` replaces the
        token embeddings of a batch of copies of one text)."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(list(texts), padding=True, return_tensors="pt").to(self.device)
        n = embeddings.shape[0] if embeddings is not None else len(texts)
        kwargs = {k: v.expand(n, -1) if v.shape[0] == 1 else v for k, v in enc.items()}
        with self.lock, torch.set_grad_enabled(grad), replace_embeddings(self.model, embeddings):
            hidden = self.model(**kwargs).last_hidden_state  # [n, pos, d]
        mask = kwargs["attention_mask"][..., None].to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)

    def embedding_input(self, inputs: Any) -> EmbeddingInput:
        """A pair of texts as an :class:`EmbeddingInput` over the tokens of both
        (``a``'s first) whose own target is ``cos(pool(enc(a)), pool(enc(b)))``.

        Raises:
            InputError: not a pair of texts.
        """
        if not (isinstance(inputs, (tuple, list)) and len(inputs) == 2):
            raise InputError("an Encoder needs a pair of texts: (text_a, text_b)")
        a, b = inputs
        va, vb = _view(self, self._encode(a), a), _view(self, self._encode(b), b)
        n_a = va.n_pos
        shift = len(a) + 1

        def similarity(emb: Tensor) -> Tensor:
            g = emb.requires_grad
            ua = self.encode(a, emb[:, :n_a], grad=g)
            ub = self.encode(b, emb[:, n_a:], grad=g)
            return torch.nn.functional.cosine_similarity(ua, ub, dim=-1)[:, None]

        va.ids, va.tokens, va.special = (
            va.ids + vb.ids,
            va.tokens + vb.tokens,
            va.special + vb.special,
        )
        va.offsets = va.offsets + [
            None if o is None else (o[0] + shift, o[1] + shift) for o in vb.offsets
        ]
        va.text = f"{a}\n{b}"
        va.segments = ["a"] * n_a + ["b"] * vb.n_pos
        va.value, va.value_name = similarity, "cosine_similarity(a, b)"
        return va
