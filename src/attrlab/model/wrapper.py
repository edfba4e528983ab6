"""The wrapped model: tokenization, batching, and runs with caches and interventions.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> logits, cache = lm.run("When Mary and John went", cache=["blocks.1.mlp.out"])
    >>> logits.shape[-1] == lm.cfg.d_vocab
    True
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
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
        """Where inputs go: the device of the token embedding."""
        weight: Tensor = self.adapter.token_embedding().weight  # type: ignore[assignment]
        return weight.device

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

    def sites(self) -> list[str]:
        """Every site name of this model (see :mod:`attrlab.model.sites`)."""
        names = all_site_names(self.cfg.n_layers)
        if self.cfg.parallel_residual:
            names = [n for n in names if not n.endswith("resid_mid")]
        return names

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
        """Each token id decoded on its own."""
        tok = self._require_tokenizer()
        ids_list = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [tok.decode([int(i)]) for i in ids_list]

    def token_id(self, token: str | int) -> int:
        """The id of a single token, given as text or id.

        Raises:
            MultiTokenTargetError: the text tokenizes to several tokens.
            TokenOutOfVocabError: the id (or text) is not in the vocabulary.
        """
        if isinstance(token, (int, torch.Tensor)) and not isinstance(token, bool):
            i = int(token)
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

    def _token_rows(self, inputs: Any, prepend_bos: bool | None) -> list[list[int]]:
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, Tensor):
            t = inputs if inputs.dim() == 2 else inputs.reshape(1, -1)
            return [[int(x) for x in row] for row in t.tolist()]
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
        if all(isinstance(x, (list, tuple, Tensor)) for x in inputs):
            return [[int(t) for t in row] for row in inputs]
        raise InputError(
            "inputs must be a string, a list of strings, token ids, or an attrlab Batch"
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
        past_key_values: Any = None,
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
            past_key_values: a Hugging Face key/value cache of a shared prefix
                (one row per batch row). ``inputs`` is then a :class:`Batch` of the
                tokens after the prefix whose ``attention_mask`` covers prefix + new
                tokens; sites, interventions and ``start_resid`` see the new tokens only.

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
        for iv in interventions or []:
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
        session = HookSession(
            self.adapter, cache_sites, ivs, grad, start_layer, start_resid, last_only
        )
        # hooks are model state: calls on one model from several threads take turns
        with self.lock, torch.set_grad_enabled(grad), session:
            out = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                past_key_values=past_key_values,
                use_cache=past_key_values is not None,
            )
        result = Cache(session.cache)
        result.batch = batch
        return out.logits, result

    # ------------------------------------------------------------- weights
    def W_U(self) -> Tensor:
        """Unembedding ``[d_model, d_vocab]``."""
        return self.adapter.W_U()

    def b_U(self) -> Tensor | None:
        return self.adapter.b_U()

    def W_O(self, layer: int) -> Tensor:
        """Attention output projection per head ``[head, d_head, d_model]``."""
        return self.adapter.W_O(layer)

    def W_out(self, layer: int) -> Tensor:
        """MLP output projection ``[d_mlp, d_model]``."""
        return self.adapter.W_out(layer)

    def apply_final_norm(self, resid: Tensor) -> Tensor:
        """The model's own final norm applied to a residual stream ``[..., d_model]``."""
        return self.adapter.final_norm()(resid)

    def unembed(self, normed: Tensor) -> Tensor:
        """The model's own unembedding (then logit soft-capping, if the model has one)."""
        logits = self.adapter.unembed()(normed)
        cap = self.cfg.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
