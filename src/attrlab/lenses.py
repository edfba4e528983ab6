"""The tuned lens: a learned affine translator per layer (Belrose et al.,
"Eliciting Latent Predictions from Transformers with the Tuned Lens").

The residual stream entering block ``l`` (``blocks.{l}.resid_pre``) is
translated ``h -> h + h @ W_l.T + b_l`` and then read like the logit lens,
through the model's own final norm and unembedding. Translators start at zero
(the tuned lens starts as the logit lens) and are trained so that each layer's
distribution matches the model's final one: the loss is the sum over layers of
``KL(p_final || p_layer)``, averaged over token positions, with the model frozen.

- :func:`train_tuned_lens` trains one on texts you give (an iterable of strings
  or token-id lists) or, for a zoo model, on its own task's generator; with a
  progress bar and resumable checkpoints (safetensors + JSON, never pickle).
- :class:`TunedLens` saves and loads as ``tuned_lens.safetensors`` +
  ``config.json``; :meth:`TunedLens.to_tuned_lens_state` /
  :meth:`TunedLens.from_tuned_lens_state` convert to and from the
  ``layer_translators`` state of the ``tuned-lens`` package (same
  parametrisation, ``nn.Linear(d, d)`` per layer added residually).
- ``al.logit_lens(lm, prompt, lens=tuned)`` reads the layers through it (same
  result type as the logit lens, with ``extra["kl_to_final"]``).

How training differs from the ``tuned-lens`` package: Adam (default lr 1e-3)
with a linear warm-up and decay instead of SGD with Nesterov momentum, and
sequences of whole texts grouped by length (no packing: zoo models have short
contexts) instead of packed chunks. The translators, the loss and the lens
itself are the same.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> lens = al.lenses.train_tuned_lens(lm, ["a b c d e", "b c d e f"], steps=5, progress=False)
    >>> r = al.logit_lens(lm, "a b c", lens=lens)
    >>> r.method, len(r) == lm.cfg.n_layers + 1
    ('tuned_lens', True)
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ._files import write_atomically
from .errors import FileFormatError, InputError
from .model.lock import holds_model_lock
from .training import (
    batch_stream,
    batches,
    lr_schedule,
    resume,
    save_checkpoint,
    sequences,
    zoo_texts,
)

__all__ = ["TunedLens", "train_tuned_lens", "lens_kl"]

WEIGHTS = "tuned_lens.safetensors"
CONFIG = "config.json"


class TunedLens:
    """One affine translator per layer: ``h -> h + h @ weight[l].T + bias[l]``.

    Args:
        weight: ``[n_layers, d_model, d_model]``; bias: ``[n_layers, d_model]``
            (zeros: the logit lens).
        meta: JSON-able facts (model name, training settings).

    Example:
        >>> lens = TunedLens.identity(n_layers=2, d_model=4)
        >>> h = torch.randn(3, 4)
        >>> bool(torch.equal(lens.translate(h, 1), h))
        True
    """

    def __init__(self, weight: Tensor, bias: Tensor, meta: dict[str, Any] | None = None):
        if weight.dim() != 3 or weight.shape[1] != weight.shape[2]:
            raise InputError(f"weight must be [n_layers, d, d], got {tuple(weight.shape)}")
        if bias.shape != weight.shape[:2]:
            raise InputError(f"bias must be [n_layers, d], got {tuple(bias.shape)}")
        if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
            raise InputError("the tuned lens has non-finite weights")
        self.weight = weight
        self.bias = bias
        self.meta = dict(meta or {})

    @classmethod
    def identity(cls, n_layers: int, d_model: int) -> TunedLens:
        """Zero translators (the logit lens).

        Example:
            >>> TunedLens.identity(3, 8).n_layers
            3
        """
        return cls(torch.zeros(n_layers, d_model, d_model), torch.zeros(n_layers, d_model))

    @property
    def n_layers(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[1])

    def translate(self, h: Tensor, layer: int) -> Tensor:
        """``h + h @ W.T + b`` for the residual entering block ``layer`` (``[..., d]``).

        Example:
            >>> lens = TunedLens(torch.eye(2)[None], torch.ones(1, 2))
            >>> lens.translate(torch.tensor([1.0, 2.0]), 0).tolist()
            [3.0, 5.0]
        """
        w = self.weight[layer].to(h.device, h.dtype)
        b = self.bias[layer].to(h.device, h.dtype)
        return h + h @ w.T + b

    def check(self, lm: Any) -> None:
        """Typed error unless the lens fits ``lm`` (layers, width).

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> TunedLens.identity(lm.cfg.n_layers, lm.cfg.d_model).check(lm)
        """
        c = lm.cfg
        if (self.n_layers, self.d_model) != (c.n_layers, c.d_model):
            raise InputError(
                f"the tuned lens is for {self.n_layers} layers x {self.d_model} wide; "
                f"the model has {c.n_layers} x {c.d_model}"
            )

    # ------------------------------------------------------------ save / load
    def save(self, path: str | Path) -> Path:
        """Write ``path/tuned_lens.safetensors`` and ``path/config.json`` (atomically).

        Example:
            >>> import tempfile
            >>> d = tempfile.mkdtemp()
            >>> lens = TunedLens.identity(2, 4)
            >>> TunedLens.load(lens.save(d)).n_layers
            2
        """
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        _atomic_save({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()},
                     p / WEIGHTS)  # fmt: skip
        cfg = {"format": "attrlab.tuned_lens/1", "n_layers": self.n_layers,
               "d_model": self.d_model, **self.meta}  # fmt: skip
        _atomic_text(json.dumps(cfg, indent=1), p / CONFIG)
        return p

    @classmethod
    def load(cls, path: str | Path) -> TunedLens:
        """Read a lens written by :meth:`save`.

        Raises:
            FileFormatError: missing or malformed files.
        """
        p = Path(path)
        try:
            cfg = json.loads((p / CONFIG).read_text())
            t = load_file(str(p / WEIGHTS))
            lens = cls(t["weight"], t["bias"], {k: v for k, v in cfg.items()
                                                 if k not in ("format", "n_layers", "d_model")})  # fmt: skip
        except (OSError, ValueError, KeyError) as e:
            raise FileFormatError(f"not a tuned lens directory: {p} ({e})") from e
        if (lens.n_layers, lens.d_model) != (cfg.get("n_layers"), cfg.get("d_model")):
            raise FileFormatError(f"{p}: config.json does not match the weights")
        return lens

    # ------------------------------------------------- the tuned-lens package
    def to_tuned_lens_state(self) -> dict[str, Tensor]:
        """The ``layer_translators`` state dict of the ``tuned-lens`` package
        (``"{l}.weight"``, ``"{l}.bias"``).

        Example:
            >>> sorted(TunedLens.identity(1, 2).to_tuned_lens_state())
            ['0.bias', '0.weight']
        """
        out = {}
        for layer in range(self.n_layers):
            out[f"{layer}.weight"] = self.weight[layer].clone()
            out[f"{layer}.bias"] = self.bias[layer].clone()
        return out

    @classmethod
    def from_tuned_lens_state(cls, state: dict[str, Tensor], meta: dict[str, Any] | None = None
                              ) -> TunedLens:  # fmt: skip
        """A lens from a ``tuned-lens`` ``layer_translators`` state dict.

        Example:
            >>> s = TunedLens.identity(2, 3).to_tuned_lens_state()
            >>> TunedLens.from_tuned_lens_state(s).n_layers
            2
        """
        n = len({k.split(".")[0] for k in state})
        try:
            w = torch.stack([state[f"{i}.weight"] for i in range(n)])
            b = torch.stack([state[f"{i}.bias"] for i in range(n)])
        except KeyError as e:
            raise FileFormatError(f"not a tuned-lens translator state: missing {e}") from e
        return cls(w, b, meta)


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))


def _atomic_text(text: str, path: Path) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ------------------------------------------------------------------ training
def _layer_logprobs(lm: Any, lens: TunedLens | None, resid: Tensor, layer: int) -> Tensor:
    """Log-probabilities read from the residual entering block ``layer`` (``[..., V]``)."""
    h = resid if lens is None or layer >= lens.n_layers else lens.translate(resid, layer)
    return lm.unembed(lm.apply_final_norm(h)).float().log_softmax(-1)


def _kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """``KL(p || q)`` over the last dimension."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


@holds_model_lock
def train_tuned_lens(
    lm: Any,
    texts: Iterable[Any] | None = None,
    steps: int = 250,
    lr: float = 1e-3,
    batch_size: int = 16,
    max_len: int = 128,
    weight_decay: float = 1e-3,
    warmup: int = 10,
    n_texts: int = 2048,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    seed: int = 0,
    progress: bool = True,
) -> TunedLens:
    """Train a tuned lens for ``lm`` (the model stays frozen).

    Args:
        texts: strings or token-id lists; None for a zoo model: ``n_texts``
            examples of its task (training split: prompt and answer).
        steps: optimizer steps (one batch each).
        lr, weight_decay, warmup: Adam, linear warm-up over ``warmup`` steps then
            linear decay to zero; weight decay pulls translators toward the identity.
        batch_size: sequences per step (grouped by length, no padding).
        max_len: longer texts are cut.
        checkpoint: a directory; every ``checkpoint_every`` steps the translators,
            Adam's state and the step are written there (safetensors + JSON), and a
            run with the same directory resumes from the last one.
        seed: data order.
        progress: a tqdm bar.

    Returns:
        The :class:`TunedLens` (``meta``: steps, final loss, texts used).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> lens = train_tuned_lens(lm, ["a b c d", "c d e f"], steps=3, progress=False)
        >>> lens.meta["steps"]
        3
    """
    for name, v in (("steps", steps), ("batch_size", batch_size), ("max_len", max_len),
                    ("checkpoint_every", checkpoint_every), ("n_texts", n_texts)):  # fmt: skip
        if not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive number, got {lr!r}")
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None:
        ck.mkdir(parents=True, exist_ok=True)  # fails before any compute if unwritable
    texts = zoo_texts(lm, n_texts, seed) if texts is None else texts
    seqs = sequences(lm, texts, max_len)
    L, d = lm.cfg.n_layers, lm.cfg.d_model
    dev = next(lm.model.parameters()).device
    weight = torch.zeros(L, d, d, device=dev, requires_grad=True)
    bias = torch.zeros(L, d, device=dev, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    params = {"weight": weight, "bias": bias}
    start = resume(ck, params, opt) if ck is not None else 0
    stream = batch_stream(seqs, batch_size, seed, start)
    lr_at = lr_schedule(lr, warmup, steps)

    sites = [f"blocks.{layer}.resid_pre" for layer in range(L)]
    loss_v = float("nan")
    bar = tqdm(range(start, steps), disable=not progress, desc="tuned lens", leave=False)
    for step in bar:
        ids = next(stream).to(dev)
        with torch.no_grad():
            logits, cache = lm.run(ids, cache=sites)
            target = logits.float().log_softmax(-1)
        lens = TunedLens.__new__(TunedLens)
        lens.weight, lens.bias, lens.meta = weight, bias, {}
        with torch.enable_grad():
            loss = torch.zeros((), device=dev)
            for layer, site in enumerate(sites):
                q = _layer_logprobs(lm, lens, cache[site].float(), layer)
                loss = loss + _kl(target, q).mean()
            reg = weight_decay * (weight.pow(2).sum() + bias.pow(2).sum())
            gw, gb = torch.autograd.grad(loss + reg, [weight, bias])
        if not (bool(torch.isfinite(gw).all()) and bool(torch.isfinite(gb).all())):
            raise InputError(f"non-finite gradient at step {step}; lower lr")
        weight.grad, bias.grad = gw, gb
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_v = float(loss.detach())
        bar.set_postfix(kl=f"{loss_v / L:.4f}")
        if ck is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(ck, params, opt, step + 1)
    meta = {"model": str(getattr(lm, "name", "")), "steps": steps, "lr": lr,
            "batch_size": batch_size, "n_sequences": len(seqs), "final_loss": loss_v,
            "seed": seed}  # fmt: skip
    return TunedLens(weight.detach().cpu(), bias.detach().cpu(), meta)


@holds_model_lock
def lens_kl(lm: Any, texts: Iterable[Any], lens: TunedLens | None = None, max_len: int = 128
            ) -> Tensor:  # fmt: skip
    """Mean ``KL(p_final || p_layer)`` per layer ``[n_layers]`` over every position
    of ``texts`` (the logit lens with ``lens=None``).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> lens_kl(lm, ["a b c d"]).shape[0] == lm.cfg.n_layers
        True
    """
    if lens is not None:
        lens.check(lm)
    seqs = sequences(lm, texts, max_len)
    L = lm.cfg.n_layers
    sites = [f"blocks.{layer}.resid_pre" for layer in range(L)]
    total = torch.zeros(L, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for ids in batches(seqs, 32, random.Random(0)):
            logits, cache = lm.run(ids.to(lm.device), cache=sites)
            target = logits.float().log_softmax(-1)
            for layer, site in enumerate(sites):
                q = _layer_logprobs(lm, lens, cache[site].float(), layer)
                total[layer] += float(_kl(target, q).sum())
            count += ids.numel()
    return total / count
