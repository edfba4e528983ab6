"""Training small sparse dictionaries (SAEs, transcoders) on a model's activations.

The model is frozen; each step runs one batch of texts with the input and
output sites cached, and fits ``decode(encode(x))`` to the output site
(the input site itself for an SAE). Loss: mean squared error summed over the
output dimensions, plus for ReLU an L1 penalty on ``f_i * |W_dec_i|``; TopK
needs none (its ``k`` sets the L0). Adam with linear warm-up and decay;
decoder rows start at norm 0.1 with the encoder as their transpose and
``b_dec`` at the mean output of the first batch. Checkpoints as in
:mod:`attrlab.training` (resumable, safetensors + JSON).

:func:`evaluate` reports the fraction of variance explained, L0 (mean number of
active features per position) and the next-token KL when the model runs with
the dictionary's reconstruction in place of the output site.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> d = train(lm, "blocks.0.mlp.in", ["a b c d e f", "b c d e f g"], out_site="blocks.0.mlp.out",
    ...           width=64, steps=5, progress=False)
    >>> d.kind, d.width
    ('transcoder', 64)
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
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

__all__ = ["train", "evaluate"]


def _check_site(lm: Any, site: str) -> str:
    if site not in lm.sites():
        raise InputError(f"unknown site {site!r}; see lm.sites() (e.g. blocks.0.mlp.in)")
    return site


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
        activation: ``relu`` (with ``l1``) or ``topk`` (with ``k``, default width/32).
        steps, lr, batch_size, max_len, warmup: the optimisation (Adam).
        checkpoint, checkpoint_every: a directory for resumable checkpoints.
        seed: initialisation and data order.

    Returns:
        The :class:`Dictionary` (``meta``: training settings and final loss).
    """
    if activation not in ("relu", "topk"):
        raise InputError(
            f"train fits 'relu' or 'topk' dictionaries (of {ACTIVATIONS}); got {activation!r}"
        )
    in_site = _check_site(lm, site)
    out = _check_site(lm, out_site) if out_site else in_site
    d_model = lm.cfg.d_model
    width = width or 8 * d_model
    for name, v in (("width", width), ("steps", steps), ("batch_size", batch_size),
                    ("checkpoint_every", checkpoint_every)):  # fmt: skip
        if not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive number, got {lr!r}")
    if activation == "topk":
        k = k or max(1, width // 32)
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None:
        ck.mkdir(parents=True, exist_ok=True)
    seqs = sequences(lm, zoo_texts(lm, n_texts, seed) if texts is None else texts, max_len)
    dev = next(lm.model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(width, d_model, generator=g)
    # decoder rows at norm 0.1 and the encoder their transpose: the first
    # reconstructions are close to b_dec (the mean), whatever the input's scale
    W_dec = (0.1 * W_dec / W_dec.norm(dim=-1, keepdim=True)).to(dev)
    params = {
        "W_enc": W_dec.T.clone().requires_grad_(True),
        "b_enc": torch.zeros(width, device=dev, requires_grad=True),
        "W_dec": W_dec.clone().requires_grad_(True),
        "b_dec": torch.zeros(d_model, device=dev, requires_grad=True),
    }
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    start = resume(ck, params, opt) if ck is not None else 0
    stream = batch_stream(seqs, batch_size, seed, start)
    lr_at = lr_schedule(lr, warmup, steps)

    shell = Dictionary(params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"],
                       in_site=in_site, out_site=out, activation=activation, k=k)  # fmt: skip
    loss_v, mse_v = float("nan"), float("nan")
    bar = tqdm(range(start, steps), disable=not progress, desc="dictionary", leave=False)
    for step in bar:
        ids = next(stream).to(dev)
        with torch.no_grad():
            _, cache = lm.run(ids, cache=list(dict.fromkeys([in_site, out])))
        x = cache[in_site].reshape(-1, d_model).float()
        y = cache[out].reshape(-1, d_model).float()
        if step == 0:
            with torch.no_grad():
                params["b_dec"].copy_(y.mean(0))
        with torch.enable_grad():
            f = shell.encode(x)
            y_hat = f @ params["W_dec"] + params["b_dec"]
            mse = (y_hat - y).pow(2).sum(-1).mean()
            loss = mse
            if activation == "relu":
                loss = loss + l1 * (f * params["W_dec"].norm(dim=-1)).sum(-1).mean()
            grads = torch.autograd.grad(loss, list(params.values()))
        for p, gr in zip(params.values(), grads):
            p.grad = gr
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_v, mse_v = float(loss.detach()), float(mse.detach())
        bar.set_postfix(mse=f"{mse_v:.4f}")
        if ck is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(ck, params, opt, step + 1)
    meta = {"model": str(getattr(lm, "name", "")), "steps": steps, "lr": lr, "l1": l1,
            "final_loss": loss_v, "final_mse": mse_v, "seed": seed}  # fmt: skip
    w = {n: params[n].detach().cpu() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    return Dictionary(
        W_enc=w["W_enc"], b_enc=w["b_enc"], W_dec=w["W_dec"], b_dec=w["b_dec"],
        in_site=in_site, out_site=out, activation=activation, k=k, meta=meta,
    )  # fmt: skip


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
