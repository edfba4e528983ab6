"""The wrapped model: tokenization, batching, and runs with caches and interventions.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> logits, cache = lm.run("When Mary and John went", cache=["blocks.1.mlp.out"])
    >>> logits.shape[-1] == lm.cfg.d_vocab
    True
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from ..errors import (
    ContextTooLongError,
    CounterfactualLengthError,
    EmptyPromptError,
    InputError,
    MultiTokenTargetError,
    SiteNotExposedError,
    TokenOutOfVocabError,
)
from .adapters import Adapter, ModelConfig, adapter_for
from .adapters.base import _META_MESSAGE, unmaterialisable
from .budget import preflight
from .hooks import HookSession
from .interventions import Intervention
from .lock import model_lock
from .sites import Site, all_site_names, parse_site


@dataclass
class Batch:
    """Tokenized, left-padded inputs: the last position is the last real token of every row.

    Attributes:
        input_ids: ``[batch, pos]``
        attention_mask: ``[batch, pos]`` (1 = real token)
        position_ids: ``[batch, pos]`` (0 at each row's first real token)
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    @property
    def lengths(self) -> Tensor:
        """Real (unpadded) length of each row, ``[batch]``."""
        return self.attention_mask.sum(-1)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device)
        )

    def repeat(self, n: int) -> Batch:
        """Each row repeated ``n`` times consecutively (``[b*n, pos]``)."""
        return Batch(
            self.input_ids.repeat_interleave(n, 0),
            self.attention_mask.repeat_interleave(n, 0),
            self.position_ids.repeat_interleave(n, 0),
        )

    def __getitem__(self, rows: Any) -> Batch:
        return Batch(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows])


def _is_int_dtype(dtype: torch.dtype) -> bool:
    """True for integer tensor dtypes (not bool, not floating / complex)."""
    return dtype != torch.bool and not dtype.is_floating_point and not dtype.is_complex


def _is_array(x: Any) -> bool:
    return type(x).__module__ == "numpy" and hasattr(x, "dtype") and hasattr(x, "shape")


def _id_row(row: Any, i: int) -> list[int]:
    """One prompt's token ids as Python ints; integers only (no floats, no bools)."""
    if _is_array(row):
        row = torch.as_tensor(row)
    if isinstance(row, Tensor):
        if not _is_int_dtype(row.dtype) or row.dim() != 1:
            raise InputError(
                f"prompt {i}: token ids must be a 1-D integer tensor, got {row.dtype} "
                f"{tuple(row.shape)}; use torch.tensor(ids, dtype=torch.long)"
            )
        return [int(x) for x in row.tolist()]
    out = []
    for t in row:
        if isinstance(t, Tensor) and t.dim() == 0 and _is_int_dtype(t.dtype):
            t = int(t)
        elif _is_array(t) and getattr(t, "ndim", 1) == 0 and t.dtype.kind in "iu":
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, int):
            raise InputError(
                f"prompt {i}: token ids must be integers, got {type(t).__name__} {t!r}; "
                "pass a list of int ids per prompt (e.g. [[464, 3290]]) or a string"
            )
        out.append(t)
    return out


class Cache(dict):
    """Mapping from site name to tensor, with the run's :class:`Batch` as ``.batch``."""

    batch: Batch


Inputs = Union[str, Sequence[str], Tensor, Sequence[Sequence[int]], Batch]


class LM:
    """A Hugging Face causal LM with named sites. Build with :func:`attrlab.load`
    or :func:`attrlab.wrap`.

    Attributes:
        model: the Hugging Face model (unchanged; attrlab only adds hooks during runs).
        tokenizer: its tokenizer (may be None if you only pass token ids).
        adapter: the per-architecture adapter.
        cfg: shapes (``n_layers``, ``n_heads``, ``d_model`` ...).
        name: model id or path.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, name: str | None = None):
        meta = unmaterialisable(model)
        if meta:
            more = f" (and {len(meta) - 3} more)" if len(meta) > 3 else ""
            raise InputError(
                _META_MESSAGE.format(what=f"parameter {', '.join(meta[:3])}{more} of this model")
            )
        self.model = model
        self.tokenizer = tokenizer
        self.adapter: Adapter = adapter_for(model)
        self.cfg: ModelConfig = self.adapter.cfg
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        model.eval()

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"LM({self.name!r}, family={c.family}, layers={c.n_layers}, heads={c.n_heads}, "
            f"d_model={c.d_model}, dtype={self.dtype}, device={self.device})"
        )

    # ---------------------------------------------------------- properties
    @property
    def lock(self) -> threading.RLock:
        """The model's re-entrant lock (:mod:`attrlab.model.lock`): attrlab calls
        on one model hold it, so calls from several threads take turns. Shared by
        every wrapper of the same ``nn.Module``."""
        return model_lock(self.model)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the token embedding (its execution
        device when accelerate offloads it)."""
        return self.adapter.input_device()

    @property
    def dtype(self) -> torch.dtype:
        weight: Tensor = self.adapter.token_embedding().weight  # type: ignore[assignment]
        return weight.dtype

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
            v = getattr(tok, attr, None) if tok is not None else None
            if v is not None:
                return int(v)
        return int(getattr(self.model.config, "pad_token_id", None) or 0)

    @contextmanager
    def intervening(self, interventions: Iterable[Intervention]) -> Iterator[None]:
        """Apply ``interventions`` to every :meth:`run` of this model in this thread
        inside the block (before each run's own interventions). The block holds
        the model's lock: runs from other threads wait until it ends.

        Example:
            >>> import attrlab as al
            >>> from attrlab.model.interventions import Intervention
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> with lm.intervening([Intervention("blocks.0.attn.z", 0.0)]):
            ...     patched, _ = lm.run("a b")
            >>> zeroed, _ = lm.run("a b", interventions=[Intervention("blocks.0.attn.z", 0.0)])
            >>> bool(torch.equal(patched, zeroed))
            True
        """
        ivs = list(interventions)
        with self.lock:
            local = self.__dict__.setdefault("_ambient", threading.local())
            stack = local.__dict__.setdefault("stack", [])
            stack.append(ivs)
            try:
                yield
            finally:
                stack.pop()

    def _ambient_interventions(self) -> list[Intervention]:
        local = self.__dict__.get("_ambient")
        stack = getattr(local, "stack", None) if local is not None else None
        return [iv for ivs in stack for iv in ivs] if stack else []

    def sites(self) -> list[str]:
        """Every site name of this model (see :mod:`attrlab.model.sites`)."""
        names = all_site_names(self.cfg.n_layers)
        if self.cfg.parallel_residual:
            names = [n for n in names if not n.endswith("resid_mid")]
        # mixture-of-experts layers have router / experts sites and no neurons
        moe = {str(lay) for lay in range(self.cfg.n_layers) if self.has_experts(lay)}

        def exists(n: str) -> bool:
            if n.endswith(("mlp.router", "mlp.experts")):
                return n.split(".")[1] in moe
            return not (n.endswith("mlp.neurons") and n.split(".")[1] in moe)

        return [n for n in names if exists(n)]

    def has_experts(self, layer: int) -> bool:
        """Whether block ``layer``'s MLP is a mixture of experts (sites
        ``mlp.router`` / ``mlp.experts``; ``cfg.n_experts`` routed experts plus
        ``cfg.n_shared_experts`` shared ones).

        Example:
            >>> import attrlab as al
            >>> al.wrap(*al.testing.tiny_model("mixtral")).has_experts(0)
            True
        """
        return self.adapter.experts(layer) is not None

    def site(self, name: str) -> Site:
        """Parse and validate a site name for this model."""
        return parse_site(name, self.cfg.n_layers)

    # -------------------------------------------------------- tokenization
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InputError("this LM was wrapped without a tokenizer; pass token ids instead")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS by default)."""
        tok = self._require_tokenizer()
        return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def to_str_tokens(self, ids: Tensor | Sequence[int]) -> list[str]:
        """Each token id decoded on its own (each distinct id once, in one batch call).

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> ids = lm.encode(" a b a")
            >>> lm.to_str_tokens(ids) == [lm.tokenizer.decode([i]) for i in ids]
            True
        """
        tok = self._require_tokenizer()
        ids_list = [int(i) for i in (ids.reshape(-1).tolist() if isinstance(ids, Tensor) else ids)]
        uniq = sorted(set(ids_list))
        names = dict(zip(uniq, tok.batch_decode([[u] for u in uniq])))
        return [names[i] for i in ids_list]

    def token_id(self, token: str | int) -> int:
        """The id of a single token, given as text or id.

        Raises:
            MultiTokenTargetError: the text tokenizes to several tokens.
            TokenOutOfVocabError: the id (or text) is not in the vocabulary.
        """
        if isinstance(token, torch.Tensor):
            if token.numel() != 1 or not _is_int_dtype(token.dtype):
                raise InputError(
                    f"a token id tensor must hold one integer, got {token.dtype} "
                    f"{tuple(token.shape)}"
                )
            token = int(token)
        if not isinstance(token, (str, bool)) and hasattr(type(token), "__index__"):
            i = operator.index(token)  # int, numpy integer; never a float
            if not 0 <= i < self.cfg.d_vocab:
                raise TokenOutOfVocabError(
                    f"token id {i} is outside the vocabulary (0..{self.cfg.d_vocab - 1})"
                )
            return i
        if not isinstance(token, str) or token == "":
            raise InputError(f"a target token must be a non-empty string or an id, got {token!r}")
        ids = self.encode(token)
        if len(ids) != 1:
            pieces = self.to_str_tokens(ids)
            raise MultiTokenTargetError(
                f"{token!r} is {len(ids)} tokens {pieces!r}, not one. Use a single-token "
                f"answer (e.g. {pieces[0]!r}) or attribute the whole continuation with "
                f"al.targets.ContinuationLogProb({token!r})."
            )
        return self.token_id(ids[0])

    def tokenize(self, inputs: Inputs, prepend_bos: bool | None = None) -> Batch:
        """Tokenize and left-pad ``inputs`` (a string, strings, ids, or a :class:`Batch`).

        ``prepend_bos=None`` follows the tokenizer's own special-token behaviour;
        ``True``/``False`` forces a BOS token on or off.

        Raises:
            EmptyPromptError, TokenOutOfVocabError, ContextTooLongError
        """
        if isinstance(inputs, Batch):
            self._check_batch(inputs)
            return inputs.to(self.device)
        rows = self._token_rows(inputs, prepend_bos)
        for i, r in enumerate(rows):
            if len(r) == 0:
                raise EmptyPromptError(
                    f"prompt {i} is empty: give at least one token"
                    if len(rows) > 1
                    else "the prompt is empty: give at least one token"
                )
            bad = [t for t in r if not 0 <= t < self.cfg.d_vocab]
            if bad:
                raise TokenOutOfVocabError(
                    f"token ids {bad[:5]} are outside the vocabulary (0..{self.cfg.d_vocab - 1})"
                )
            if self.cfg.n_ctx is not None and len(r) > self.cfg.n_ctx:
                raise ContextTooLongError(
                    f"prompt {i} has {len(r)} tokens; this model's context is {self.cfg.n_ctx}"
                )
        width = max(len(r) for r in rows)
        pad = self.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return Batch(ids, mask, pos).to(self.device)

    def _check_batch(self, batch: Batch) -> None:
        """Raise unless ``batch`` holds integer ids ``[batch, pos]`` in the vocabulary."""
        ids = batch.input_ids
        if not isinstance(ids, Tensor) or ids.dim() != 2 or not _is_int_dtype(ids.dtype):
            raise InputError(
                "Batch.input_ids must be an integer tensor [batch, pos]; got "
                + (f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else repr(ids))
                + ". Build batches with lm.tokenize(...)"
            )
        mask, pos = batch.attention_mask, batch.position_ids
        # with a key/value cache the mask also covers the cached prefix: it may be wider
        if (
            not isinstance(pos, Tensor)
            or pos.shape != ids.shape
            or not isinstance(mask, Tensor)
            or mask.dim() != 2
            or mask.shape[0] != ids.shape[0]
            or mask.shape[1] < ids.shape[1]
        ):
            raise InputError(
                f"Batch.attention_mask and .position_ids must be tensors of the shape of "
                f"input_ids {tuple(ids.shape)}. Build batches with lm.tokenize(...)"
            )
        if ids.numel():
            self._check_vocab(ids)

    def _check_vocab(self, ids: Tensor) -> None:
        """Raise :class:`TokenOutOfVocabError` if an id of ``ids`` is outside ``[0, d_vocab)``."""
        bad = ids[(ids < 0) | (ids >= self.cfg.d_vocab)]
        if bad.numel():
            raise TokenOutOfVocabError(
                f"token ids {bad[:5].tolist()} are outside the vocabulary "
                f"(0..{self.cfg.d_vocab - 1})"
            )

    def _token_rows(self, inputs: Any, prepend_bos: bool | None) -> list[list[int]]:
        if isinstance(inputs, str):
            inputs = [inputs]
        if _is_array(inputs):
            inputs = torch.as_tensor(inputs)
        if isinstance(inputs, Tensor):
            if not _is_int_dtype(inputs.dtype):
                raise InputError(
                    f"token ids must be an integer tensor (torch.long), got dtype {inputs.dtype}; "
                    "pass ids from lm.tokenize(...).input_ids or torch.tensor(ids, dtype=torch.long)"
                )
            if inputs.dim() not in (1, 2):
                raise InputError(
                    f"token ids must be 1-D [pos] (one prompt) or 2-D [batch, pos], got shape "
                    f"{tuple(inputs.shape)}; loop over the extra dimension or reshape it yourself"
                )
            t = inputs if inputs.dim() == 2 else inputs.reshape(1, -1)
            return [[int(x) for x in row] for row in t.tolist()]
        if not isinstance(inputs, Sequence):
            raise InputError(
                f"inputs must be a string, a list of strings, token ids [[id, ...], ...] or "
                f"an integer tensor [batch, pos], or an attrlab Batch; got {type(inputs).__name__}"
            )
        if len(inputs) == 0:
            raise EmptyPromptError("no prompts given")
        if all(isinstance(x, str) for x in inputs):
            tok = self._require_tokenizer()
            rows: list[list[int]] = []
            for text in inputs:
                if text == "":
                    rows.append([])
                    continue
                ids = list(tok(text, add_special_tokens=prepend_bos is not False)["input_ids"])
                bos = getattr(tok, "bos_token_id", None)
                if prepend_bos and bos is not None and (not ids or ids[0] != bos):
                    ids = [bos, *ids]
                rows.append(ids)
            return rows
        if all(isinstance(x, (list, tuple, Tensor)) or _is_array(x) for x in inputs):
            return [_id_row(row, i) for i, row in enumerate(inputs)]
        raise InputError(
            "inputs must be a string, a list of strings, token ids [[id, ...], ...] or an "
            "integer tensor [batch, pos], or an attrlab Batch"
        )

    def check_counterfactual(self, batch: Batch, cf: Batch) -> None:
        """Raise :class:`CounterfactualLengthError` unless ``cf`` matches ``batch`` in shape."""
        if batch.shape != cf.shape or not torch.equal(batch.attention_mask, cf.attention_mask):
            lines = []
            for name, b in (("prompt", batch), ("counterfactual", cf)):
                for row in range(b.shape[0]):
                    real = b.input_ids[row][b.attention_mask[row].bool()]
                    toks = self.to_str_tokens(real) if self.tokenizer is not None else real.tolist()
                    lines.append(f"  {name} {row} ({len(toks)} tokens): {toks!r}")
            raise CounterfactualLengthError(
                "the counterfactual must tokenize to the same length as the prompt, "
                "position by position:\n" + "\n".join(lines)
            )

    # ----------------------------------------------------------------- runs
    def run(
        self,
        inputs: Inputs,
        cache: Iterable[str] | None = None,
        interventions: Iterable[Intervention] | None = None,
        *,
        grad: bool = False,
        start_layer: int | None = None,
        start_resid: Tensor | None = None,
        last_only: bool = False,
        prepend_bos: bool | None = None,
        kv_cache: Any = None,
        logit_columns: Tensor | None = None,
    ) -> tuple[Tensor, Cache]:
        """Run the model; return ``(logits, cache)``.

        Args:
            inputs: a string, strings, token ids ``[batch, pos]``, or a :class:`Batch`.
            cache: site names to record (values after any intervention).
            interventions: :class:`Intervention` objects; their ``rows`` let
                each batch row carry its own change.
            grad: keep the autograd graph; cached tensors are then live graph
                nodes, so ``torch.autograd.grad(metric, cache[site])`` works.
            start_layer, start_resid: skip blocks below ``start_layer`` and feed
                ``start_resid`` ``[batch, pos, d_model]`` (e.g. a cached
                ``resid_pre``) into it instead.
            last_only: compute logits for the last position only (``[batch, 1, vocab]``).
            kv_cache: a Hugging Face key/value cache of a shared prefix
                (one row per batch row). ``inputs`` is then a :class:`Batch` of the
                tokens after the prefix whose ``attention_mask`` covers prefix + new
                tokens; sites, interventions and ``start_resid`` see the new tokens only.
            logit_columns: vocabulary ids (``Target.logit_columns()``): compute only
                these logits, the others are zero (a plain linear unembedding;
                otherwise all are computed). For targets that read a few logits.

        Returns:
            logits ``[batch, pos, d_vocab]`` (after any soft-capping) and a :class:`Cache`.

        Example:
            >>> import attrlab as al
            >>> from attrlab.model.interventions import Intervention
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> clean, cache = lm.run("a b c", cache=["blocks.1.resid_pre"])
            >>> same, _ = lm.run("a b c", start_layer=1, start_resid=cache["blocks.1.resid_pre"])
            >>> bool(torch.allclose(clean, same, atol=1e-5))
            True
        """
        batch = self.tokenize(inputs, prepend_bos)
        cache_sites = [self.site(n) for n in (cache or [])]
        ivs = []
        for iv in [*self._ambient_interventions(), *(interventions or [])]:
            if not isinstance(iv, Intervention):
                raise InputError(f"interventions must be Intervention objects, got {type(iv)}")
            site = self.site(iv.site)
            if site.read_only:
                raise SiteNotExposedError(f"site {site.name!r} can be read but not written")
            iv.site = site.name
            ivs.append((site, iv))
        if start_layer is not None:
            if not 0 <= start_layer < self.cfg.n_layers:
                from ..errors import IndexRangeError

                raise IndexRangeError(
                    f"start_layer {start_layer} out of range 0..{self.cfg.n_layers - 1}"
                )
            if start_resid is None:
                raise InputError("start_layer needs start_resid (the resid_pre of that layer)")
        if cache_sites:  # say beforehand what a large cache will need
            rows, n_pos = batch.shape
            sites = [s.name for s in cache_sites]
            past = int(kv_cache.get_seq_length()) if hasattr(kv_cache, "get_seq_length") else 0
            preflight(
                self, sites, rows, n_pos, grad, logit_positions=1 if last_only else None, past=past
            )
        session = HookSession(
            self.adapter, cache_sites, ivs, grad, start_layer, start_resid, last_only,
            logit_columns,
        )  # fmt: skip
        try:
            # hooks are model state: calls on one model from several threads take turns
            with self.lock, torch.set_grad_enabled(grad), session:
                logits, _ = self.hf_forward(
                    batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    kv_cache=kv_cache,
                    use_cache=kv_cache is not None,
                )
        except (NotImplementedError, RuntimeError) as e:
            meta = unmaterialisable(self.model) if "meta" in str(e) else []
            if meta:  # weights moved to the meta device after wrapping
                raise InputError(_META_MESSAGE.format(what=f"parameter {meta[0]}")) from e
            raise
        if logits.device.type == "meta":  # every weight moved to meta after wrapping
            meta = unmaterialisable(self.model) or ["?"]
            raise InputError(_META_MESSAGE.format(what=f"parameter {meta[0]}"))
        result = Cache(session.cache)
        result.batch = batch
        return logits, result

    def hf_forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        kv_cache: Any = None,
        use_cache: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        """The Hugging Face model's own forward, no hooks; ``(logits, kv_cache)``.

        The one call site that passes a key/value cache to the model, under the
        keyword the installed transformers takes (see ``Adapter.kv_kwargs``).
        ``kwargs`` go to the model (e.g. ``logits_to_keep``).

        Args:
            input_ids: ``[batch, pos]``.
            kv_cache: a cache of a shared prefix to continue from, or None.
            use_cache: return the (updated) cache as the second element.

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> ids = lm.tokenize("a b c").input_ids
            >>> logits, kv = lm.hf_forward(ids[:, :2], use_cache=True)
            >>> last, _ = lm.hf_forward(ids[:, 2:], kv_cache=kv, use_cache=True)
            >>> full, _ = lm.hf_forward(ids)
            >>> bool(torch.allclose(last[:, -1], full[:, -1], atol=1e-5))
            True
        """
        with self.lock:
            return self.hf_forward_held(
                input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                kv_cache=kv_cache,
                use_cache=use_cache,
                **kwargs,
            )

    def hf_forward_held(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        kv_cache: Any = None,
        use_cache: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        """:meth:`hf_forward` without taking the model's lock: for threads working
        for a caller that holds it (e.g. a parallel prefix walk), which must not
        install hooks meanwhile.

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> ids = lm.tokenize("a b c").input_ids
            >>> with lm.lock:
            ...     held, _ = lm.hf_forward_held(ids)
            >>> bool(torch.equal(held, lm.hf_forward(ids)[0]))
            True
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **self.adapter.kv_kwargs(kv_cache, use_cache),
            **kwargs,
        )
        return out.logits, (self.adapter.kv_returned(out) if use_cache else None)

    @contextmanager
    def mlps_skipped(self) -> Iterator[int]:
        """In the calling thread the MLPs compute nothing and return their input
        in their output format (the adapter's passthrough), for runs that
        replace every MLP's output anyway (transcoders); hooks on the MLP input
        and output still fire. Yields how many MLPs are skipped.

        Example:
            >>> import attrlab as al
            >>> from attrlab.model.interventions import Intervention
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> zero = [Intervention(f"blocks.{l}.mlp.out", 0.0) for l in range(lm.cfg.n_layers)]
            >>> with lm.mlps_skipped() as n:
            ...     fast, _ = lm.run("a b", interventions=zero)
            >>> slow, _ = lm.run("a b", interventions=zero)
            >>> n, bool(torch.allclose(fast, slow, atol=1e-6))
            (2, True)
        """
        from .swap import swapped_forwards

        owner = threading.get_ident()
        skips = {}
        for layer in range(self.cfg.n_layers):
            skip = self.adapter.mlp_passthrough(layer)
            if skip is not None:
                skips[id(self.adapter.mlp(layer))] = skip

        def wrap(m: nn.Module) -> Any:
            skip = skips.get(id(m))
            if skip is None:
                return None
            own = m.forward

            def forward(*args: Any, **kwargs: Any) -> Any:
                return (skip if threading.get_ident() == owner else own)(*args, **kwargs)

            return forward

        with swapped_forwards(self.model, wrap) as n:
            yield n

    # ------------------------------------------------------------- weights
    # (on the input device, where cached values are, also when a device_map puts
    # the layer elsewhere; a no-op on one device)
    def _home(self, t: Tensor | None) -> Tensor | None:
        return t if t is None else t.to(self.device)

    def W_U(self) -> Tensor:
        """Unembedding ``[d_model, d_vocab]``."""
        return self.adapter.W_U().to(self.device)

    def b_U(self) -> Tensor | None:
        return self._home(self.adapter.b_U())

    def W_O(self, layer: int) -> Tensor:
        """Attention output projection per head ``[head, d_head, d_model]``."""
        return self.adapter.W_O(layer).to(self.device)

    def W_out(self, layer: int) -> Tensor:
        """MLP output projection ``[d_mlp, d_model]``."""
        return self.adapter.W_out(layer).to(self.device)

    def apply_final_norm(self, resid: Tensor) -> Tensor:
        """The model's own final norm applied to a residual stream ``[..., d_model]``."""
        return self.adapter.final_norm()(resid).to(resid.device)

    def unembed(self, normed: Tensor) -> Tensor:
        """The model's own unembedding (then logit soft-capping, if the model has one)."""
        logits = self.adapter.unembed()(normed).to(normed.device)
        if self.adapter.logit_multiplier != 1.0:  # Granite, Cohere
            logits = logits * self.adapter.logit_multiplier
        cap = self.cfg.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ------------------------------------------ what methods and units need
    # (they use these, never ``lm.adapter``: per-family knowledge stays in the adapters)
    def embed_ids(self, ids: Tensor) -> Tensor:
        """The model's own token embeddings (the ``embed`` site, no gradient) of
        ``ids`` ``[pos]`` -> ``[pos, d_model]`` (or ``[batch, pos]`` -> ``[batch, pos, d_model]``).

        Example:
            >>> import torch, attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> tuple(lm.embed_ids(torch.tensor([1, 2, 3])).shape) == (3, lm.cfg.d_model)
            True
        """
        ids = ids.to(self.device)
        m = self.adapter.embedding_multiplier  # Granite scales the module's output
        with torch.no_grad():
            e = self.adapter.token_embedding()(ids[None] if ids.dim() == 1 else ids)
            e = e if m == 1.0 else e * m
            return (e[0] if ids.dim() == 1 else e).detach()

    def b_O(self, layer: int) -> Tensor | None:
        """Attention output projection bias ``[d_model]`` (None if it has none)."""
        return self._home(self.adapter.b_O(layer))

    def b_out(self, layer: int) -> Tensor | None:
        """MLP output projection bias ``[d_model]`` (None if it has none)."""
        return self._home(self.adapter.b_out(layer))

    def block_path(self, layer: int) -> str:
        """Dotted name of block ``layer`` in ``lm.model`` (e.g. for ``modules=``
        of :func:`attrlab.data.featurize`).

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> lm.block_path(1)
            'transformer.h.1'
        """
        block = self.adapter.block(layer)
        return next(n for n, m in self.model.named_modules() if m is block)

    def _norm(self, name: str) -> nn.Module | None:
        """The norm called ``name``: ``"final_norm"``, ``"blocks.{l}.attn_out_norm"``
        or ``"blocks.{l}.mlp_out_norm"`` (post-attention / post-MLP norms, Gemma 2/3)."""
        if name == "final_norm":
            return self.adapter.final_norm()
        parts = name.split(".")
        if (
            len(parts) == 3
            and parts[0] == "blocks"
            and parts[2] in ("attn_out_norm", "mlp_out_norm")
        ):
            from ..errors import IndexRangeError

            layer = int(parts[1])
            if not 0 <= layer < self.cfg.n_layers:
                raise IndexRangeError(f"layer {layer} out of range (0..{self.cfg.n_layers - 1})")
            if parts[2] == "attn_out_norm":
                return self.adapter.attn_out_norm(layer)
            return self.adapter.mlp_out_norm(layer)
        raise InputError(
            f"unknown norm {name!r}: use 'final_norm', 'blocks.{{l}}.attn_out_norm' or "
            "'blocks.{l}.mlp_out_norm'"
        )

    def _require_norm(self, name: str) -> nn.Module:
        norm = self._norm(name)
        if norm is None:
            raise InputError(f"this model ({self.cfg.family}) has no {name}")
        return norm

    def has_norm(self, name: str) -> bool:
        """Whether the model has the norm ``name`` (see :meth:`frozen_norm`).

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> lm.has_norm("final_norm"), lm.has_norm("blocks.0.attn_out_norm")
            (True, False)
        """
        return self._norm(name) is not None

    def norm_scale(self, name: str, x: Tensor) -> Tensor:
        """The reciprocal scale ``1/std`` the norm ``name`` applies to ``x``
        ``[..., d_model]`` -> ``[..., 1]`` (what the ``final_norm.scale`` site reads)."""
        return self.adapter.norm_scale(self._require_norm(name), x)

    def frozen_norm(self, name: str, x: Tensor, scale: Tensor) -> Tensor:
        """The norm ``name`` applied to ``x`` ``[..., d_model]`` with its scale frozen to
        ``scale`` ``[..., 1]``: affine in ``x``. With ``scale = norm_scale(name, x)`` it
        equals the model's own norm of ``x``. Computed in float64 for float64 inputs.

        Names: ``"final_norm"``, ``"blocks.{l}.attn_out_norm"``, ``"blocks.{l}.mlp_out_norm"``.

        Example:
            >>> import torch, attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("llama"))
            >>> x = torch.randn(2, lm.cfg.d_model)
            >>> y = lm.frozen_norm("final_norm", x, lm.norm_scale("final_norm", x))
            >>> bool(torch.allclose(y, lm.apply_final_norm(x), atol=1e-5))
            True
        """
        return self.adapter.norm_linearized(self._require_norm(name), x, scale)

    def frozen_norm_T(self, name: str, vec: Tensor, scale: Tensor) -> Tensor:
        """The transpose of :meth:`frozen_norm`'s linear part applied to ``vec``
        ``[..., d_model]``: for every ``x``, ``(frozen(x) - frozen(0)) . vec ==
        x . frozen_norm_T(vec)``. It pulls an output direction (an unembedding
        column) back to the norm's input. Taken by autograd through
        :meth:`frozen_norm`, in ``vec``'s dtype.

        Example:
            >>> import torch, attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2", dtype=torch.float64))
            >>> x, v = torch.randn(3, lm.cfg.d_model, dtype=torch.float64).unbind(0)[:2]
            >>> s = lm.norm_scale("final_norm", x)
            >>> lhs = (lm.frozen_norm("final_norm", x, s) - lm.frozen_norm("final_norm", 0 * x, s)) @ v
            >>> bool(torch.isclose(lhs, x @ lm.frozen_norm_T("final_norm", v, s)))
            True
        """
        with torch.enable_grad():
            x = torch.zeros_like(vec, requires_grad=True)
            y = self.frozen_norm(name, x, scale.to(vec.dtype))
            (g,) = torch.autograd.grad(y, x, grad_outputs=vec.to(y.dtype))
        return g.detach()

    def norm_bias(self, name: str) -> Tensor | None:
        """The bias ``[d_model]`` the norm ``name`` adds after scaling (None for RMSNorm):
        ``frozen_norm(name, 0, scale)``."""
        return self._home(self.adapter.norm_affine(self._require_norm(name))[1])

    def attn_scale(self, layer: int) -> float:
        """The factor on ``q . k`` in layer ``layer``'s attention scores.

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("llama"))
            >>> lm.attn_scale(0) == lm.cfg.d_head**-0.5
            True
        """
        return self.adapter.attn_scale(layer)

    def qk_scores_exact(self, n_pos: int) -> bool:
        """Whether :meth:`scores_qk` reproduces the attention scores of an
        ``n_pos``-token causal run."""
        return self.adapter.qk_scores_exact(n_pos)

    def scores_qk(self, q: Tensor, k: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The ``attn.q`` / ``attn.k`` sites as score-ready queries and keys (rotary
        applied, key heads repeated): ``scores = attn_scale(l) * q' . k'``.

        Example:
            >>> import torch, attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("llama"))
            >>> q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8)
            >>> tuple(lm.scores_qk(q, k, torch.arange(3)[None])[1].shape)
            (1, 3, 4, 8)
        """
        return self.adapter.scores_qk(q, k, position_ids)

    def next_layer_qkv(self, layer: int, resid_mid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v ``[..., head, d_head]`` (k, v: key/value heads; rotary not applied)
        of layer ``layer + 1`` when block ``layer``'s ``resid_mid`` is ``resid_mid``
        ``[..., d_model]``: block ``layer``'s MLP, then block ``layer + 1``'s input norm
        and projections — the model's own modules (sequential blocks without
        post-block norms).

        Example:
            >>> import torch, attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("llama"))
            >>> q, k, v = lm.next_layer_qkv(0, torch.randn(1, 3, lm.cfg.d_model))
            >>> tuple(q.shape) == (1, 3, lm.cfg.n_heads, lm.cfg.d_head)
            True
        """
        from ..errors import IndexRangeError

        a, c = self.adapter, self.cfg
        if not 0 <= layer < c.n_layers - 1:
            raise IndexRangeError(f"layer {layer} has no next layer (0..{c.n_layers - 2})")
        ln1 = a.sub(layer + 1, a.attn_in_norm_name)
        assert ln1 is not None
        normed = a.mlp_in_norm(layer)(resid_mid)
        if self.has_experts(layer):  # a mixture of experts reads [batch, pos, d_model]
            mlp_out = a.mlp(layer)(normed.reshape(-1, 1, c.d_model)).reshape(normed.shape)
        else:
            mlp_out = a.mlp(layer)(normed)
        if a.residual_multiplier != 1.0:  # Granite
            mlp_out = mlp_out * a.residual_multiplier
        dev = resid_mid.device  # the layers may be on other devices (device_map)
        h = ln1(resid_mid + mlp_out.to(dev))
        mods = a.qkv_modules(layer + 1)
        if "qkv" in mods:
            return a.split_qkv(mods["qkv"](h).to(dev))
        q, k, v = (mods[p](h).to(dev).unflatten(-1, (-1, c.d_head)) for p in ("q", "k", "v"))
        return q, k, v
