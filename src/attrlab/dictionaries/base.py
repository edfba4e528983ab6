"""A sparse dictionary: a sparse autoencoder (SAE) or a transcoder.

``encode(x) = act((x - b_dec_in) @ W_enc + b_enc)`` and
``decode(f) = f @ W_dec + b_dec`` (plus ``x @ W_skip`` for transcoders with a
skip connection). An SAE reads and writes one site (``in_site == out_site``);
a transcoder reads an MLP's input and writes its output. Activations: ``relu``,
``jumprelu`` (a per-feature ``threshold``: ``pre * (pre > threshold)``) and
``topk`` (the ``k`` largest pre-activations, ReLU'd, per position).

Example:
    >>> import torch
    >>> d = Dictionary.random(8, 32, in_site="blocks.0.resid_pre", activation="topk", k=4, seed=0)
    >>> f = d.encode(torch.randn(3, 8))
    >>> tuple(f.shape), int((f != 0).sum(-1).max()) <= 4
    ((3, 32), True)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["Dictionary", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "jumprelu", "topk")


@dataclass
class Dictionary:
    """Weights and sites of one sparse dictionary (plain tensors, no module state).

    Args:
        W_enc: ``[d_in, width]``; b_enc: ``[width]``.
        W_dec: ``[width, d_out]``; b_dec: ``[d_out]``.
        in_site, out_site: attrlab site names (``blocks.3.resid_pre``,
            ``blocks.3.mlp.in`` -> ``blocks.3.mlp.out`` for a transcoder).
        activation: ``relu``, ``jumprelu`` (needs ``threshold [width]``) or ``topk``
            (needs ``k``).
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding
            (SAELens' default for SAEs; only when ``d_in == d_out``).
        W_skip: optional ``[d_in, d_out]`` linear skip (transcoders).
        meta: JSON-able facts (training, source file).
    """

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    in_site: str
    out_site: str = ""
    activation: str = "relu"
    threshold: Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = False
    W_skip: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_site = self.out_site or self.in_site
        d_in, width = self.W_enc.shape if self.W_enc.dim() == 2 else (None, None)
        if self.W_enc.dim() != 2 or self.W_dec.dim() != 2 or self.W_dec.shape[0] != width:
            raise InputError(
                f"W_enc must be [d_in, width] and W_dec [width, d_out]; got "
                f"{tuple(self.W_enc.shape)} and {tuple(self.W_dec.shape)}"
            )
        if self.b_enc.shape != (width,) or self.b_dec.shape != (self.W_dec.shape[1],):
            raise InputError("b_enc must be [width] and b_dec [d_out]")
        if self.activation not in ACTIVATIONS:
            raise InputError(
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.activation == "jumprelu" and (
            self.threshold is None or self.threshold.shape != (width,)
        ):
            raise InputError("a jumprelu dictionary needs threshold [width]")
        if self.activation == "topk" and not (isinstance(self.k, int) and 0 < self.k <= int(width)):
            raise InputError(f"a topk dictionary needs 0 < k <= width, got k={self.k!r}")
        if self.apply_b_dec_to_input and d_in != self.W_dec.shape[1]:
            raise InputError("apply_b_dec_to_input needs d_in == d_out")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
            t = getattr(self, name)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise InputError(f"the dictionary's {name} has non-finite values")

    # ------------------------------------------------------------ shapes
    @property
    def width(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def kind(self) -> str:
        """``"sae"`` (one site) or ``"transcoder"``."""
        return "sae" if self.in_site == self.out_site else "transcoder"

    # ------------------------------------------------------------ maps
    def pre_activation(self, x: Tensor) -> Tensor:
        """``(x - b_dec?) @ W_enc + b_enc`` ``[..., width]``."""
        W = self.W_enc.to(x.device, x.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec.to(x.device, x.dtype)
        return x @ W + self.b_enc.to(x.device, x.dtype)

    def activate(self, pre: Tensor) -> Tensor:
        """The activation function on pre-activations ``[..., width]``.

        Example:
            >>> d = Dictionary.random(2, 3, "s", activation="jumprelu", seed=0)
            >>> d.threshold = torch.tensor([0.5, 0.5, 0.5])
            >>> [round(v, 2) for v in d.activate(torch.tensor([0.4, 0.6, -1.0])).tolist()]
            [0.0, 0.6, 0.0]
        """
        if self.activation == "relu":
            return pre.clamp_min(0)
        if self.activation == "jumprelu":
            assert self.threshold is not None
            return torch.where(
                pre > self.threshold.to(pre.device, pre.dtype), pre, torch.zeros_like(pre)
            )
        assert self.k is not None
        top = pre.topk(self.k, dim=-1)
        out = torch.zeros_like(pre)
        return out.scatter(-1, top.indices, top.values.clamp_min(0))

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``[..., width]`` of inputs ``[..., d_in]``."""
        return self.activate(self.pre_activation(x))

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """The reconstruction ``f @ W_dec + b_dec`` (``+ x @ W_skip`` given the input)."""
        out = f @ self.W_dec.to(f.device, f.dtype) + self.b_dec.to(f.device, f.dtype)
        if self.W_skip is not None:
            if x is None:
                raise InputError("this transcoder has a skip connection: decode(f, x) needs x")
            out = out + x @ self.W_skip.to(x.device, x.dtype)
        return out

    def __call__(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), x)

    def to(self, dtype: torch.dtype | None = None, device: Any = None) -> Dictionary:
        """A copy with every tensor in ``dtype`` / on ``device`` (None: unchanged).

        Example:
            >>> Dictionary.random(4, 8, "s").to(torch.float16).W_enc.dtype
            torch.float16
        """
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")
        moved = {n: getattr(self, n) for n in names}
        moved = {
            n: None if t is None else t.to(device=device, dtype=dtype) for n, t in moved.items()
        }
        return replace(self, **moved, meta=dict(self.meta))

    @classmethod
    def random(cls, d: int, width: int, in_site: str, out_site: str = "", activation: str = "relu",
               k: int | None = None, seed: int = 0, d_out: int | None = None) -> Dictionary:  # fmt: skip
        """A random dictionary (tests, benchmarks).

        Example:
            >>> Dictionary.random(4, 16, "blocks.0.mlp.in", "blocks.0.mlp.out").kind
            'transcoder'
        """
        g = torch.Generator().manual_seed(seed)
        d_out = d if d_out is None else d_out
        W_dec = torch.randn(width, d_out, generator=g)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
        threshold = torch.full((width,), 0.1) if activation == "jumprelu" else None
        return cls(
            W_enc=torch.randn(d, width, generator=g) / d**0.5, b_enc=torch.zeros(width),
            W_dec=W_dec, b_dec=torch.zeros(d_out), in_site=in_site, out_site=out_site,
            activation=activation, threshold=threshold, k=k or (width // 4 if activation == "topk" else None),
        )  # fmt: skip
