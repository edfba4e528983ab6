"""Training small sparse dictionaries (SAEs, transcoders) on a model's activations.

The model is frozen; each step runs one batch of texts with the input and
output sites cached, and fits ``decode(encode(x))`` to the output site
(the input site itself for an SAE). Loss: mean squared error summed over the
output dimensions, plus a sparsity penalty that depends on the activation:

- ``relu``: L1 on ``f_i * |W_dec_i|`` (coefficient ``l1``);
- ``topk``: none (its ``k`` sets the L0);
- ``jumprelu`` (Rajamanoharan et al. 2024, "Jumping Ahead"): L0, the number of
  active features (coefficient ``l0``, warmed up linearly over the first
  ``l0_warmup`` of the steps). The step function has no useful derivative, so
  the per-feature threshold ``theta`` (kept >= 0) is trained
  with straight-through pseudo-derivatives with a rectangle kernel ``K`` of
  bandwidth ``eps``: ``d/dtheta JumpReLU(z) = -(theta/eps) K((z - theta)/eps)``
  and ``d/dtheta H(z - theta) = -(1/eps) K((z - theta)/eps)``; the
  pre-activation ``z`` gets the ordinary gradient ``H(z - theta)`` from the
  reconstruction and none from the L0 term.

With ``normalize`` (default for ``jumprelu``) the input and output are scaled
by fixed scalars, measured on the first batch, to unit total variance, so the
bandwidth, the initial threshold and ``l0`` mean the same on any model (the
normalised MSE is about ``1 - FVE``, so ``l0`` is the FVE one active feature
must buy); the scales are folded into the returned weights.

Adam with linear warm-up and decay; decoder rows start at norm 0.1 with the
encoder as their transpose and ``b_dec`` at the mean output of the first
batch. Checkpoints as in :mod:`attrlab.training` (resumable, safetensors +
JSON).

:func:`evaluate` reports the fraction of variance explained, L0 (mean number of
active features per position) and the next-token KL when the model runs with
the dictionary's reconstruction in place of the output site.
:func:`train_transcoders` trains one transcoder per layer
(``blocks.l.mlp.in -> blocks.l.mlp.out``).

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> d = train(lm, "blocks.0.mlp.in", ["a b c d e f", "b c d e f g"], out_site="blocks.0.mlp.out",
    ...           width=64, steps=5, progress=False)
    >>> d.kind, d.width
    ('transcoder', 64)
    >>> j = train(lm, "blocks.0.mlp.in", ["a b c d e f"], out_site="blocks.0.mlp.out",
    ...           width=64, activation="jumprelu", steps=5, progress=False)
    >>> j.activation, tuple(j.threshold.shape)
    ('jumprelu', (64,))
"""

from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from ..model.interventions import Intervention
from ..model.lock import holds_model_lock
from ..training import (
    batch_stream,
    batches,
    lr_schedule,
    resume,
    save_checkpoint,
    sequences,
    zoo_texts,
)
from .base import ACTIVATIONS, Dictionary

__all__ = ["train", "evaluate", "jumprelu_ste", "train_transcoders"]


def _check_site(lm: Any, site: str) -> str:
    if site not in lm.sites():
        raise InputError(f"unknown site {site!r}; see lm.sites() (e.g. blocks.0.mlp.in)")
    return site


def _rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel: 1 on ``(-1/2, 1/2)``, else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``z * H(z - theta)``; backward: ``H(z - theta)`` to ``z`` and the
    pseudo-derivative ``-(theta/eps) K((z - theta)/eps)`` to ``theta``."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        gz = g * (z > theta).to(g.dtype)
        gt = -(theta / ctx.eps) * _rectangle((z - theta) / ctx.eps) * g
        return gz, gt.reshape(-1, *theta.shape).sum(0), None


class _Step(torch.autograd.Function):
    """``H(z - theta)``; backward: nothing to ``z``, ``-(1/eps) K((z - theta)/eps)``
    to ``theta``."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        gt = -(1.0 / ctx.eps) * _rectangle((z - theta) / ctx.eps) * g
        return torch.zeros_like(z), gt.reshape(-1, *theta.shape).sum(0), None


def jumprelu_ste(pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """JumpReLU activations and the L0 (active features per row), both with the
    straight-through pseudo-derivatives of Rajamanoharan et al. (2024) for the
    threshold (rectangle kernel of width ``bandwidth``).

    Returns:
        ``(f [..., width], l0 [...])``: forward values are exactly
        ``pre * (pre > threshold)`` and the count of active features.

    Example:
        >>> pre = torch.tensor([[0.30, 0.1004, 0.05]])
        >>> th = torch.full((3,), 0.1, requires_grad=True)
        >>> f, l0 = jumprelu_ste(pre, th, 0.001)
        >>> f.tolist(), l0.tolist()
        ([[0.30000001192092896, 0.10040000081062317, 0.0]], [2.0])
        >>> (g,) = torch.autograd.grad(l0.sum(), th)   # only feature 1 is within eps/2
        >>> [round(v) for v in g.tolist()]
        [0, -1000, 0]
    """
    f = _JumpReLU.apply(pre, threshold, bandwidth)
    l0 = _Step.apply(pre, threshold, bandwidth).sum(-1)
    return f, l0


def _activate(
    pre: Tensor, activation: str, k: int | None, threshold: Tensor | None, bandwidth: float
) -> tuple[Tensor, Tensor | None]:
    """Training-time features of pre-activations ``[..., width]`` and, for
    ``jumprelu``, the differentiable count of active features ``[...]``."""
    if activation == "relu":
        return pre.clamp_min(0), None
    if activation == "jumprelu":
        assert threshold is not None
        return jumprelu_ste(pre, threshold, bandwidth)
    assert k is not None
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0)), None


def _optimise(
    params: dict[str, Tensor],
    opt: Any,
    step_loss: Callable[[int], tuple[Tensor, dict[str, float]]],
    start: int,
    steps: int,
    lr_at: Callable[[int], float],
    ck: Path | None,
    checkpoint_every: int,
    progress: bool,
    desc: str,
    nonnegative: tuple[str, ...] = (),
) -> dict[str, float]:
    """Adam steps ``start..steps`` on ``step_loss(step) -> (loss, stats)``, with
    the lr schedule, ``nonnegative`` parameters clamped at 0, a progress bar
    showing ``stats`` and checkpoints; returns the last step's stats."""
    last: dict[str, float] = {}
    bar = tqdm(range(start, steps), disable=not progress, desc=desc, leave=False)
    for step in bar:
        with torch.enable_grad():
            loss, stats = step_loss(step)
            grads = torch.autograd.grad(loss, list(params.values()))
        for p, gr in zip(params.values(), grads):
            p.grad = gr
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # e.g. a threshold below 0 would let negative values through
            for name in nonnegative:
                params[name].clamp_(min=0.0)
        last = {"loss": float(loss.detach()), **stats}
        bar.set_postfix({key: f"{v:.4g}" for key, v in stats.items()})
        if ck is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(ck, params, opt, step + 1)
    return last


def _check_train_args(**kw: Any) -> None:
    for name in ("width", "steps", "batch_size", "checkpoint_every"):
        v = kw[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    for name in ("lr", "bandwidth", "threshold_init"):
        v = kw[name]
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InputError(f"{name} must be a positive number, got {v!r}")
    for name in ("l1", "l0"):
        v = kw[name]
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise InputError(f"{name} must be a number >= 0, got {v!r}")
    if not (isinstance(kw["l0_warmup"], (int, float)) and 0 <= kw["l0_warmup"] <= 1):
        raise InputError(f"l0_warmup must be a fraction in [0, 1], got {kw['l0_warmup']!r}")


@holds_model_lock
def train(
    lm: Any,
    site: str,
    texts: Iterable[Any] | None = None,
    out_site: str | None = None,
    width: int | None = None,
    activation: str = "relu",
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
) -> Dictionary:
    """Train a dictionary reading ``site`` (and writing ``out_site``: a transcoder).

    Args:
        site: the input site (``blocks.l.resid_pre``, ``blocks.l.mlp.in`` …).
        texts: strings or token-id lists; None for a zoo model (its task's texts).
        out_site: the output site (None: an SAE on ``site``).
        width: number of features (default 8 x d_model).
        activation: ``relu`` (with ``l1``), ``topk`` (with ``k``, default width/32)
            or ``jumprelu`` (with ``l0``, ``bandwidth``, ``threshold_init``,
            ``l0_warmup``; see the module docstring).
        l1: the ReLU's L1 coefficient.
        l0: the JumpReLU's L0 coefficient (in normalised units: the fraction of
            variance one active feature must explain to be worth its cost).
        bandwidth, threshold_init: the rectangle kernel's width and the initial
            threshold (normalised units).
        l0_warmup: fraction of the steps over which ``l0`` ramps up from 0.
        normalize: scale input and output to unit variance while training
            (None: only for ``jumprelu``); folded into the returned weights.
        steps, lr, batch_size, max_len, warmup: the optimisation (Adam).
        checkpoint, checkpoint_every: a directory for resumable checkpoints.
        seed: initialisation and data order.

    Returns:
        The :class:`Dictionary` (``meta``: training settings and final loss).

    Raises:
        InputError: unknown site or activation, or a bad setting (checked before
            any forward pass).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> d = train(lm, "blocks.0.resid_pre", ["a b c d"], width=32, activation="topk", k=4,
        ...           steps=3, progress=False)
        >>> d.kind, d.k
        ('sae', 4)
    """
    if activation not in ACTIVATIONS:
        raise InputError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    in_site = _check_site(lm, site)
    out = _check_site(lm, out_site) if out_site else in_site
    d_model = lm.cfg.d_model
    width = 8 * d_model if width is None else width
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
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None:
        ck.mkdir(parents=True, exist_ok=True)
    seqs = sequences(lm, zoo_texts(lm, n_texts, seed) if texts is None else texts, max_len)
    dev = next(lm.model.parameters()).device
    sites = list(dict.fromkeys([in_site, out]))

    def activations(ids: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            _, cache = lm.run(ids.to(dev), cache=sites)
        return cache[in_site].reshape(-1, d_model).float(), cache[out].reshape(-1, d_model).float()

    # fixed scales from the first batch (the same batch on a resumed run)
    x0, y0 = activations(next(batch_stream(seqs, batch_size, seed, 0)))
    if normalize:
        sx = float((x0 - x0.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12).rsqrt())
        sy = float((y0 - y0.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12).rsqrt())
    else:
        sx = sy = 1.0

    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(width, d_model, generator=g)
    # decoder rows at norm 0.1 and the encoder their transpose: the first
    # reconstructions are close to b_dec (the mean), whatever the input's scale
    W_dec = (0.1 * W_dec / W_dec.norm(dim=-1, keepdim=True)).to(dev)
    params = {
        "W_enc": W_dec.T.clone().requires_grad_(True),
        "b_enc": torch.zeros(width, device=dev, requires_grad=True),
        "W_dec": W_dec.clone().requires_grad_(True),
        "b_dec": (y0.mean(0) * sy).to(dev).requires_grad_(True),
    }
    if activation == "jumprelu":
        params["threshold"] = torch.full((width,), float(threshold_init), device=dev)
        params["threshold"].requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    start = resume(ck, params, opt) if ck is not None else 0
    stream = batch_stream(seqs, batch_size, seed, start)
    lr_at = lr_schedule(lr, warmup, steps)
    l0_ramp = max(1, round(l0_warmup * steps))

    def step_loss(step: int) -> tuple[Tensor, dict[str, float]]:
        x, y = activations(next(stream))
        x, y = x * sx, y * sy
        pre = x @ params["W_enc"] + params["b_enc"]
        f, n_active = _activate(pre, activation, k, params.get("threshold"), bandwidth)
        mse = ((f @ params["W_dec"] + params["b_dec"]) - y).pow(2).sum(-1).mean()
        if activation == "relu":
            loss = mse + l1 * (f * params["W_dec"].norm(dim=-1)).sum(-1).mean()
        elif activation == "jumprelu":
            assert n_active is not None
            loss = mse + l0 * min(1.0, (step + 1) / l0_ramp) * n_active.mean()
        else:
            loss = mse
        l0_now = float((f != 0).sum(-1).float().mean())
        return loss, {"mse": float(mse.detach()) / sy**2, "l0": l0_now}

    last = _optimise(params, opt, step_loss, start, steps, lr_at, ck, checkpoint_every, progress,
                     "dictionary", ("threshold",) if activation == "jumprelu" else ())  # fmt: skip
    loss_v, mse_v = last.get("loss", float("nan")), last.get("mse", float("nan"))
    meta: dict[str, Any] = {
        "model": str(getattr(lm, "name", "")), "activation": activation, "steps": steps,
        "lr": lr, "seed": seed, "final_loss": loss_v, "final_mse": mse_v,
        "normalize": [sx, sy] if normalize else None,
    }  # fmt: skip
    if activation == "relu":
        meta["l1"] = l1
    if activation == "jumprelu":
        meta.update(l0=l0, bandwidth=bandwidth, threshold_init=threshold_init, l0_warmup=l0_warmup)
    w = {n: p.detach().cpu() for n, p in params.items()}
    # fold the scales: pre = (x sx) W_enc + b_enc; y = (f W_dec + b_dec) / sy
    return Dictionary(
        W_enc=w["W_enc"] * sx, b_enc=w["b_enc"], W_dec=w["W_dec"] / sy, b_dec=w["b_dec"] / sy,
        in_site=in_site, out_site=out, activation=activation, k=k,
        threshold=w.get("threshold"), meta=meta,
    )  # fmt: skip


def train_transcoders(
    lm: Any,
    texts: Iterable[Any] | None = None,
    kind: str = "jumprelu",
    width: int = 512,
    steps: int = 1500,
    layers: Iterable[int] | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    **options: Any,
) -> list[Dictionary]:
    """One transcoder per layer, ``blocks.l.mlp.in -> blocks.l.mlp.out``, each
    trained by :func:`train` (seed ``seed + l``).

    Args:
        texts: strings or token-id lists; None for a zoo model (its task's texts).
        kind: the activation, ``jumprelu``, ``topk`` or ``relu``.
        width, steps: per transcoder.
        layers: which layers (default: all).
        checkpoint: a directory; each layer checkpoints in ``layer_{l}/`` under it.
        options: further :func:`train` settings (``k``, ``l0``, ``l1``, ``lr``, ...).

    Returns:
        The transcoders in layer order (``meta["train_seconds"]`` each).

    Raises:
        InputError: bad layer, kind or setting (before any training).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> ds = train_transcoders(lm, ["a b c d e f"], kind="topk", width=32, steps=2,
        ...                        progress=False)
        >>> [(d.in_site, d.out_site) for d in ds][0]
        ('blocks.0.mlp.in', 'blocks.0.mlp.out')
    """
    n_layers = int(lm.cfg.n_layers)
    todo = list(range(n_layers)) if layers is None else [int(la) for la in layers]
    bad = [la for la in todo if not 0 <= la < n_layers]
    if bad or not todo:
        raise InputError(f"layers must be in 0..{n_layers - 1}, got {todo}")
    if kind not in ACTIVATIONS:
        raise InputError(f"kind must be one of {', '.join(ACTIVATIONS)}; got {kind!r}")
    fixed = {"lm", "site", "texts", "out_site", "activation", "width", "steps", "seed",
             "progress", "checkpoint"}  # fmt: skip
    allowed = set(inspect.signature(train).parameters) - fixed
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(f"train_transcoders: unknown option(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(sorted(allowed))}")  # fmt: skip
    texts = list(texts) if texts is not None else None
    out = []
    bar = tqdm(todo, disable=not progress, desc="transcoders", unit="layer")
    for la in bar:
        bar.set_postfix(layer=la)
        t0 = time.perf_counter()
        d = train(
            lm, f"blocks.{la}.mlp.in", texts, out_site=f"blocks.{la}.mlp.out", width=width,
            activation=kind, steps=steps, seed=seed + la, progress=progress,
            checkpoint=None if checkpoint is None else Path(checkpoint) / f"layer_{la}",
            **options,
        )  # fmt: skip
        d.meta["train_seconds"] = round(time.perf_counter() - t0, 2)
        out.append(d)
    return out


@holds_model_lock
@torch.no_grad()
def evaluate(lm: Any, d: Dictionary, texts: Iterable[Any], max_len: int = 128) -> dict[str, float]:
    """Fraction of variance explained (``fve``), mean L0, and the next-token
    ``kl`` (mean KL(original || with the reconstruction spliced in)) on ``texts``.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> d = Dictionary.random(lm.cfg.d_model, 64, "blocks.0.resid_pre")
        >>> sorted(evaluate(lm, d, ["a b c d"]))
        ['fve', 'kl', 'l0', 'mse']
    """
    seqs = sequences(lm, texts, max_len)
    se = var = l0 = kl = 0.0
    n = 0
    ys = []
    for ids in batches(seqs, 32, random.Random(0)):
        ids = ids.to(lm.device)
        logits, cache = lm.run(ids, cache=list(dict.fromkeys([d.in_site, d.out_site])))
        x, y = cache[d.in_site].float(), cache[d.out_site].float()
        f = d.encode(x)
        y_hat = d.decode(f, x)
        se += float((y_hat - y).pow(2).sum())
        ys.append(y.reshape(-1, y.shape[-1]))
        l0 += float((f != 0).sum())
        spliced, _ = lm.run(ids, interventions=[Intervention(d.out_site, y_hat.to(y.dtype))])
        p = logits.float().log_softmax(-1)
        q = spliced.float().log_softmax(-1)
        kl += float((p.exp() * (p - q)).sum())
        n += x.shape[0] * x.shape[1]
    allys = torch.cat(ys)
    var = float((allys - allys.mean(0)).pow(2).sum())
    return {"fve": 1 - se / var, "l0": l0 / n, "mse": se / n, "kl": kl / n}
