"""Cross-layer transcoders (CLTs): features read at layer ``l``'s MLP input and
write to the MLP outputs of layers ``l, l+1, ..., L-1``.

For layers ``0..L-1`` (``layers`` names the model layers), with inputs
``x_l`` at ``blocks.{layers[l]}.mlp.in`` and outputs ``y_j`` at
``blocks.{layers[j]}.mlp.out``::

    f_l   = act(x_l @ W_enc[l] + b_enc[l])                      # [..., width]
    y_j^  = sum_{l <= j} f_l @ W_dec[l][:, j - l] + b_dec[j]    # [..., d_out]

``W_dec[l]`` is ``[width, L - l, d_out]`` (circuit-tracer's arrangement of a
CLT decoder). Activations as for :class:`~attrlab.dictionaries.Dictionary`.
:func:`train_clt` trains all layers jointly on the summed MSE of every output
(plus the activation's sparsity penalty, as :func:`~attrlab.dictionaries.train`;
ReLU's L1 weighs a feature by the norm of its whole decoder); :func:`evaluate_clt`
reports per-output FVE, per-layer L0 and the next-token KL with every
reconstruction spliced in at once (computed from the clean inputs).

Example:
    >>> import torch
    >>> c = CrossLayerTranscoder.random(8, 16, n_layers=3, seed=0)
    >>> xs = torch.randn(5, 3, 8)                       # [..., layer, d_in]
    >>> f = c.encode(xs)
    >>> tuple(f.shape), tuple(c.decode(f).shape)
    ((5, 3, 16), (5, 3, 8))
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..model.interventions import Intervention
from ..model.lock import holds_model_lock
from ..training import batch_stream, batches, lr_schedule, resume, sequences, zoo_texts
from .base import ACTIVATIONS
from .train import _activate, _check_train_args, _optimise

__all__ = ["CrossLayerTranscoder", "train_clt", "evaluate_clt"]


@dataclass
class CrossLayerTranscoder:
    """Weights of a cross-layer transcoder (plain tensors).

    Args:
        W_enc: ``[L, d_in, width]``; b_enc: ``[L, width]``.
        W_dec: a list of ``L`` tensors, ``W_dec[l]`` ``[width, L - l, d_out]``.
        b_dec: ``[L, d_out]``.
        layers: the model layers of the ``L`` slots (default ``0..L-1``).
        activation: ``relu``, ``jumprelu`` (``threshold [L, width]``) or ``topk`` (``k``).
    """

    W_enc: Tensor
    b_enc: Tensor
    W_dec: list[Tensor]
    b_dec: Tensor
    layers: list[int] = field(default_factory=list)
    activation: str = "relu"
    threshold: Tensor | None = None
    k: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.W_enc.dim() != 3:
            raise InputError(f"W_enc must be [L, d_in, width], got {tuple(self.W_enc.shape)}")
        L, _, width = self.W_enc.shape
        self.layers = list(self.layers) or list(range(L))
        if len(self.layers) != L or len(self.W_dec) != L:
            raise InputError(f"a CLT over {L} layers needs {L} layers and {L} decoders")
        d_out = int(self.b_dec.shape[-1])
        for la, W in enumerate(self.W_dec):
            if tuple(W.shape) != (width, L - la, d_out):
                raise InputError(
                    f"W_dec[{la}] must be [width, L - {la}, d_out] = {(width, L - la, d_out)}, "
                    f"got {tuple(W.shape)}"
                )
        if self.b_enc.shape != (L, width) or self.b_dec.shape != (L, d_out):
            raise InputError("b_enc must be [L, width] and b_dec [L, d_out]")
        if self.activation not in ACTIVATIONS:
            raise InputError(f"activation must be one of {', '.join(ACTIVATIONS)}")
        if self.activation == "jumprelu" and (
            self.threshold is None or self.threshold.shape != (L, width)
        ):
            raise InputError("a jumprelu CLT needs threshold [L, width]")
        if self.activation == "topk" and not (isinstance(self.k, int) and 0 < self.k <= width):
            raise InputError(f"a topk CLT needs 0 < k <= width, got k={self.k!r}")

    @property
    def n_layers(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def width(self) -> int:
        return int(self.W_enc.shape[2])

    @property
    def in_sites(self) -> list[str]:
        """``blocks.{l}.mlp.in`` for each slot."""
        return [f"blocks.{la}.mlp.in" for la in self.layers]

    @property
    def out_sites(self) -> list[str]:
        """``blocks.{l}.mlp.out`` for each slot."""
        return [f"blocks.{la}.mlp.out" for la in self.layers]

    def pre_activation(self, xs: Tensor) -> Tensor:
        """``x_l @ W_enc[l] + b_enc[l]`` for inputs ``[..., L, d_in]`` -> ``[..., L, width]``."""
        W = self.W_enc.to(xs.device, xs.dtype)
        return torch.einsum("...ld,ldw->...lw", xs, W) + self.b_enc.to(xs.device, xs.dtype)

    def encode(self, xs: Tensor) -> Tensor:
        """Feature activations ``[..., L, width]`` of inputs ``[..., L, d_in]``.

        Example:
            >>> c = CrossLayerTranscoder.random(4, 8, n_layers=2, activation="topk", k=2)
            >>> int((c.encode(torch.randn(3, 2, 4)) != 0).sum(-1).max()) <= 2
            True
        """
        pre = self.pre_activation(xs)
        th = None if self.threshold is None else self.threshold.to(pre.device, pre.dtype)
        if self.activation == "jumprelu":
            assert th is not None
            return torch.where(pre > th, pre, torch.zeros_like(pre))
        return _activate(pre, self.activation, self.k, None, 1.0)[0]

    def decode(self, f: Tensor) -> Tensor:
        """Reconstructions ``[..., L, d_out]`` of every output from features
        ``[..., L, width]``: output ``j`` sums the decoders of layers ``<= j``."""
        L = self.n_layers
        out = self.b_dec.to(f.device, f.dtype).expand(*f.shape[:-1], -1).clone()
        for la in range(L):
            W = self.W_dec[la].to(f.device, f.dtype)  # [width, L - la, d_out]
            out[..., la:, :] += torch.einsum("...w,wjd->...jd", f[..., la, :], W)
        return out

    def __call__(self, xs: Tensor) -> Tensor:
        return self.decode(self.encode(xs))

    @classmethod
    def random(cls, d: int, width: int, n_layers: int, activation: str = "relu",
               k: int | None = None, seed: int = 0) -> CrossLayerTranscoder:  # fmt: skip
        """A random CLT (tests).

        Example:
            >>> CrossLayerTranscoder.random(4, 8, n_layers=3).W_dec[1].shape
            torch.Size([8, 2, 4])
        """
        g = torch.Generator().manual_seed(seed)
        return cls(
            W_enc=torch.randn(n_layers, d, width, generator=g) / d**0.5,
            b_enc=torch.zeros(n_layers, width),
            W_dec=[torch.randn(width, n_layers - la, d, generator=g) / width**0.5
                   for la in range(n_layers)],
            b_dec=torch.zeros(n_layers, d), activation=activation,
            threshold=torch.full((n_layers, width), 0.1) if activation == "jumprelu" else None,
            k=k or (max(1, width // 4) if activation == "topk" else None),
        )  # fmt: skip


def _stack(cache: dict[str, Tensor], sites: list[str]) -> Tensor:
    return torch.stack([cache[s].float() for s in sites], dim=-2)  # [..., L, d]


@holds_model_lock
def train_clt(
    lm: Any,
    texts: Iterable[Any] | None = None,
    width: int | None = None,
    activation: str = "jumprelu",
    layers: Iterable[int] | None = None,
    k: int | None = None,
    l1: float = 1e-3,
    l0: float = 1e-3,
    bandwidth: float = 1e-3,
    threshold_init: float = 1e-3,
    l0_warmup: float = 0.1,
    normalize: bool | None = None,
    steps: int = 1000,
    lr: float = 2e-3,
    batch_size: int = 32,
    max_len: int = 128,
    warmup: int = 20,
    n_texts: int = 4096,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> CrossLayerTranscoder:
    """Train a cross-layer transcoder over ``layers`` (default: all), every
    output fitted jointly. Settings as :func:`attrlab.dictionaries.train`
    (``l0`` and ``l1`` per slot; with ``normalize`` each site is scaled to unit
    variance and the scales are folded into the weights).

    Raises:
        InputError: bad layers, activation or setting (before any forward pass).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> c = train_clt(lm, ["a b c d e f"], width=16, steps=3, progress=False)
        >>> c.in_sites[0], [tuple(W.shape) for W in c.W_dec][-1]
        ('blocks.0.mlp.in', (16, 1, 32))
    """
    if activation not in ACTIVATIONS:
        raise InputError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    n_model = int(lm.cfg.n_layers)
    todo = list(range(n_model)) if layers is None else sorted({int(la) for la in layers})
    if not todo or not all(0 <= la < n_model for la in todo):
        raise InputError(f"layers must be in 0..{n_model - 1}, got {todo}")
    d = int(lm.cfg.d_model)
    width = 8 * d if width is None else width
    _check_train_args(width=width, steps=steps, batch_size=batch_size, lr=lr,
                      checkpoint_every=checkpoint_every, bandwidth=bandwidth,
                      threshold_init=threshold_init, l1=l1, l0=l0, l0_warmup=l0_warmup)  # fmt: skip
    if activation == "topk":
        k = k or max(1, width // 32)
        if not isinstance(k, int) or not 0 < k <= width:
            raise InputError(f"k must be an integer in [1, width], got {k!r}")
    else:
        k = None
    normalize = activation == "jumprelu" if normalize is None else bool(normalize)
    L = len(todo)
    ins = [f"blocks.{la}.mlp.in" for la in todo]
    outs = [f"blocks.{la}.mlp.out" for la in todo]
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None:
        ck.mkdir(parents=True, exist_ok=True)
    seqs = sequences(lm, zoo_texts(lm, n_texts, seed) if texts is None else texts, max_len)
    dev = next(lm.model.parameters()).device

    def activations(ids: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            _, cache = lm.run(ids.to(dev), cache=ins + outs)
        return _stack(cache, ins).reshape(-1, L, d), _stack(cache, outs).reshape(-1, L, d)

    x0, y0 = activations(next(batch_stream(seqs, batch_size, seed, 0)))

    def scale(v: Tensor) -> Tensor:  # [L, 1]: 1 / sqrt(total variance) per site
        if not normalize:
            return torch.ones(L, 1)
        return (v - v.mean(0)).pow(2).sum(-1).mean(0).clamp_min(1e-12).rsqrt()[:, None]

    sx, sy = scale(x0).to(dev), scale(y0).to(dev)
    g = torch.Generator().manual_seed(seed)
    params: dict[str, Tensor] = {}
    for la in range(L):
        W = torch.randn(width, L - la, d, generator=g)
        # each decoder block at norm 0.1 / sqrt(#outputs); the encoder the transpose of the
        # block writing to its own layer
        W = 0.1 * W / W.norm(dim=-1, keepdim=True) / math.sqrt(L - la)
        params[f"W_dec_{la}"] = W.to(dev)
    params["W_enc"] = torch.stack([params[f"W_dec_{la}"][:, 0].T for la in range(L)]).clone()
    params["b_enc"] = torch.zeros(L, width, device=dev)
    params["b_dec"] = (y0.mean(0) * sy).to(dev)
    if activation == "jumprelu":
        params["threshold"] = torch.full((L, width), float(threshold_init), device=dev)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    start = resume(ck, params, opt) if ck is not None else 0
    stream = batch_stream(seqs, batch_size, seed, start)
    l0_ramp = max(1, round(l0_warmup * steps))

    def step_loss(step: int) -> tuple[Tensor, dict[str, float]]:
        x, y = activations(next(stream))
        x, y = x * sx, y * sy
        pre = torch.einsum("nld,ldw->nlw", x, params["W_enc"]) + params["b_enc"]
        f, n_active = _activate(pre, activation, k, params.get("threshold"), bandwidth)
        y_hat = params["b_dec"].expand(f.shape[0], L, d)
        for la in range(L):
            W = params[f"W_dec_{la}"]
            y_hat = y_hat + torch.cat(
                [y_hat.new_zeros(f.shape[0], la, d), torch.einsum("nw,wjd->njd", f[:, la], W)],
                dim=1,
            )
        mse_l = (y_hat - y).pow(2).sum(-1).mean(0)  # [L], normalised
        loss = mse_l.sum()
        if activation == "relu":
            norms = torch.stack(
                [params[f"W_dec_{la}"].pow(2).sum((1, 2)).sqrt() for la in range(L)]
            )  # [L, width]: each feature's whole decoder
            loss = loss + l1 * (f * norms).sum(-1).sum(-1).mean()
        elif activation == "jumprelu":
            assert n_active is not None
            loss = loss + l0 * min(1.0, (step + 1) / l0_ramp) * n_active.sum(-1).mean()
        fve_proxy = float((1 - mse_l.detach()).mean()) if normalize else float("nan")
        return loss, {"l0": float((f != 0).sum(-1).float().mean()), "fve~": fve_proxy}

    last = _optimise(params, opt, step_loss, start, steps, lr_schedule(lr, warmup, steps), ck,
                     checkpoint_every, progress, "clt",
                     ("threshold",) if activation == "jumprelu" else ())  # fmt: skip
    w = {n: p.detach().cpu() for n, p in params.items()}
    sxc, syc = sx.cpu(), sy.cpu()  # fold: pre = (x sx) W_enc + b_enc; y_j = (...) / sy_j
    meta = {"model": str(getattr(lm, "name", "")), "activation": activation, "steps": steps,
            "lr": lr, "seed": seed, "final_loss": last.get("loss", float("nan")),
            "normalize": normalize}  # fmt: skip
    if activation == "jumprelu":
        meta.update(l0=l0, bandwidth=bandwidth, threshold_init=threshold_init)
    return CrossLayerTranscoder(
        W_enc=w["W_enc"] * sxc[:, :, None], b_enc=w["b_enc"],
        W_dec=[w[f"W_dec_{la}"] / syc[la:, :][None] for la in range(L)],
        b_dec=w["b_dec"] / syc, layers=todo, activation=activation,
        threshold=w.get("threshold"), k=k, meta=meta,
    )  # fmt: skip


@holds_model_lock
@torch.no_grad()
def evaluate_clt(
    lm: Any, clt: CrossLayerTranscoder, texts: Iterable[Any], max_len: int = 128
) -> dict[str, Any]:
    """Per output layer ``fve`` (list), overall ``fve`` (all outputs pooled),
    per-layer ``l0`` (list), ``l0_total`` (active features per position, all
    layers) and ``kl``: mean next-token KL(original || every MLP output replaced by
    its reconstruction from the clean inputs, all at once).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> c = CrossLayerTranscoder.random(lm.cfg.d_model, 16, lm.cfg.n_layers)
        >>> sorted(evaluate_clt(lm, c, ["a b c d"]))
        ['fve', 'fve_per_layer', 'kl', 'l0', 'l0_total']
    """
    seqs = sequences(lm, texts, max_len)
    ins, outs = clt.in_sites, clt.out_sites
    se = torch.zeros(clt.n_layers, dtype=torch.float64)
    l0 = torch.zeros(clt.n_layers, dtype=torch.float64)
    ys, kl, n = [], 0.0, 0
    for ids in batches(seqs, 32, random.Random(0)):
        ids = ids.to(lm.device)
        logits, cache = lm.run(ids, cache=ins + outs)
        x, y = _stack(cache, ins), _stack(cache, outs)  # [b, p, L, d]
        f = clt.encode(x)
        y_hat = clt.decode(f)
        se += (y_hat - y).pow(2).sum((0, 1, 3)).double()
        l0 += (f != 0).sum((0, 1, 3)).double()
        ys.append(y.reshape(-1, clt.n_layers, y.shape[-1]))
        dt = cache[outs[0]].dtype
        spliced, _ = lm.run(
            ids,
            interventions=[Intervention(s, y_hat[..., i, :].to(dt)) for i, s in enumerate(outs)],
        )
        p, q = logits.float().log_softmax(-1), spliced.float().log_softmax(-1)
        kl += float((p.exp() * (p - q)).sum())
        n += ids.shape[0] * ids.shape[1]
    allys = torch.cat(ys).double()
    var = (allys - allys.mean(0)).pow(2).sum((0, 2))  # [L]
    return {
        "fve": float(1 - se.sum() / var.sum()),
        "fve_per_layer": [float(v) for v in 1 - se / var],
        "l0": [float(v) for v in l0 / n],
        "l0_total": float(l0.sum() / n),
        "kl": kl / n,
    }
