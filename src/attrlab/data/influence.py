"""Influence functions with K-FAC / EK-FAC curvature: attribute a model output to training examples.

The influence of training example ``z_i`` on a query measurement ``f`` (a margin,
an answer log-probability …) is ``-grad f^T H^-1 grad L(z_i)``: how much ``f`` rises
when ``z_i`` is up-weighted (positive: the example supports the output). ``H`` is
approximated, per ``nn.Linear`` module (the blocks of a block-diagonal matrix),
by a Kronecker product ("Optimizing Neural Networks with Kronecker-factored
Approximate Curvature"; EK-FAC: "Fast Approximate Natural Gradient Descent in a
Kronecker-factored Eigenbasis"; for influence on LMs: "Studying Large Language
Model Generalization with Influence Functions"):

- ``A = E[a a^T]``: covariance of the module's input activations ``a`` (with a
  column of ones appended when the module has a bias), ``[d_in+1, d_in+1]``;
- ``S = E[g g^T]``: covariance of the loss gradient ``g`` with respect to the
  module's output (pre-activation), ``[d_out, d_out]``.

Both averages run over every position that enters the module (every example of
a classifier; every attended token of a sequence model). The curvature block is
``S ⊗ A`` acting on the weight gradient ``G [d_out, d_in+1]`` (bias last). With
``A = Q_A diag(e_A) Q_A^T`` and ``S = Q_S diag(e_S) Q_S^T``:

- **K-FAC** preconditions ``G`` as ``Q_S ((Q_S^T G Q_A) / (e_S e_A^T + λ)) Q_A^T``,
  i.e. ``(S ⊗ A + λ I)^-1 vec(G)``;
- **EK-FAC** keeps the eigenbasis but replaces the eigenvalues ``e_S e_A^T`` by
  the corrections ``Λ = E_i[(Q_S^T G_i Q_A)^2]`` over training examples ``i``
  (``G_i``: the example's gradient, summed over its tokens).

Damping ``λ`` is as in Kronfluence: a number is added as it is (Kronfluence's
``damping_factor``, default ``1e-8`` there); ``None`` (attrlab's default) uses
Kronfluence's heuristic ``0.1 * mean(eigenvalues)`` of each module.

The loss whose curvature is fitted is the cross-entropy. ``fisher="true"``
(the default, as Kronfluence's ``use_empirical_fisher=False``) draws the labels
from the model's own predictive distribution (seeded: reproducible and
identical after a resume); ``fisher="empirical"`` uses the data's labels.

Storage. :func:`fit_factors` writes everything into one
:class:`~attrlab.data.store.FeatureStore`: the raw per-example training-loss
gradients of the tracked modules as its feature shards (via
:func:`~attrlab.data.featurize.featurize`), then per shard of examples the
partial sums of ``A`` and ``S``, then the eigendecomposition, then per shard
the partial sums of ``Λ`` — every file checksummed, atomically written and
recorded, so a process killed at any instant resumes with the missing pieces
and gives bit-identical factors. Under ``torchrun`` (or with ``rank`` /
``world_size``) each rank computes every stage for its own shards, and rank 0
combines the covariance shards and eigendecomposes: the same files as one
process (see :mod:`attrlab.data.distributed`). :class:`Influence` scores
queries against the store shard by shard (``cache=True`` records each shard's score block, so
scoring resumes too).

Example:
    >>> import tempfile, torch
    >>> import attrlab.data as ad
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    >>> store = ad.fit_factors(net, (x, y), tempfile.mkdtemp(), shard_size=8)
    >>> r = ad.Influence(store).attribute(net, (x[:2], y[:2]))
    >>> r.scores.shape, r.method
    (torch.Size([2, 20]), 'ekfac')
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import InputError, NonFiniteError
from ..result import Attribution
from .featurize import Examples, GradientFeaturizer, checkpoint_hash, featurize
from .outputs import AnswerLogProb, ClassificationMargin, ClassLogProb, ModelOutput
from .project import Projector
from .store import FeatureStore

__all__ = ["Influence", "fit_factors", "linear_modules", "self_influence"]

STRATEGIES = ("ekfac", "kfac")
FISHERS = ("true", "empirical")
#: Kronfluence's heuristic damping: this times the mean eigenvalue of each module
HEURISTIC_DAMPING_SCALE = 0.1
StoreLike = Union[FeatureStore, str, Path]
#: training rows converted to float64 at a time while scoring
ROWS = 256
#: elements of the intermediate of one low-rank scoring step (``query_rank``)
LOW_RANK_CHUNK = 1 << 22
#: queries whose raw gradients are held at once when scoring with ``query_rank``
QUERY_CHUNK = 64
#: seconds a rank without a process group waits for the other ranks' files
RANK_WAIT = 24 * 3600.0


@dataclass
class ModuleBlock:
    """One tracked ``nn.Linear``: where its weight (and bias) sit in the flat gradient.

    Example:
        >>> ModuleBlock("fc", 3, 2, True, 0, 6).d_in1
        4
    """

    name: str
    d_in: int
    d_out: int
    bias: bool
    w_offset: int  # start of the weight [d_out, d_in] in the flat gradient
    b_offset: int  # start of the bias [d_out] (-1 without bias)
    transposed: bool = False  # weight stored [d_in, d_out] (Hugging Face ``Conv1D``)

    @property
    def d_in1(self) -> int:
        """Input dimension with the bias column."""
        return self.d_in + int(self.bias)

    def matrix(self, flat: Tensor) -> Tensor:
        """``[m, P]`` flat gradients -> ``[m, d_out, d_in+1]`` (bias last)."""
        m = flat.shape[0]
        w = flat[:, self.w_offset : self.w_offset + self.d_out * self.d_in]
        if self.transposed:
            w = w.reshape(m, self.d_in, self.d_out).transpose(1, 2)
        else:
            w = w.reshape(m, self.d_out, self.d_in)
        if not self.bias:
            return w
        b = flat[:, self.b_offset : self.b_offset + self.d_out].reshape(m, self.d_out, 1)
        return torch.cat([w, b], dim=2)

    def scatter(self, mat: Tensor, out: Tensor) -> None:
        """Write ``[m, d_out, d_in+1]`` back into the flat ``out`` ``[m, P]``."""
        m = mat.shape[0]
        w = mat[:, :, : self.d_in]
        if self.transposed:
            w = w.transpose(1, 2)
        out[:, self.w_offset : self.w_offset + self.d_out * self.d_in] = w.reshape(m, -1)
        if self.bias:
            out[:, self.b_offset : self.b_offset + self.d_out] = mat[:, :, self.d_in]


def is_linear(mod: nn.Module) -> bool:
    """Whether K-FAC covers ``mod``: an ``nn.Linear``, or Hugging Face's ``Conv1D`` (GPT-2's
    linear layer with its weight stored transposed, ``[d_in, d_out]``).

    Example:
        >>> is_linear(torch.nn.Linear(2, 3)), is_linear(torch.nn.Conv1d(2, 3, 1))
        (True, False)
    """
    if isinstance(mod, nn.Linear):
        return True
    w = getattr(mod, "weight", None)
    return (
        type(mod).__name__ == "Conv1D"
        and isinstance(w, Tensor)
        and w.dim() == 2
        and getattr(mod, "nf", None) == w.shape[1]
    )


def _dims(mod: nn.Module) -> tuple[int, int, bool]:
    """``(d_in, d_out, transposed)`` of a linear-like module."""
    w = mod.weight
    assert isinstance(w, Tensor)
    if isinstance(mod, nn.Linear):
        return int(w.shape[1]), int(w.shape[0]), False
    return int(w.shape[0]), int(w.shape[1]), True


def linear_modules(model: nn.Module, modules: Sequence[str] | None = None) -> list[str]:
    """Names of the linear modules to track (``nn.Linear``, and Hugging Face ``Conv1D``):
    all of them, or those under ``modules`` prefixes.

    Raises:
        InputError: no ``nn.Linear`` matches (K-FAC covers linear layers only).

    Example:
        >>> import torch
        >>> linear_modules(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)))
        ['0', '2']
    """
    if hasattr(model, "model") and hasattr(model, "adapter"):
        model = model.model  # type: ignore[assignment]
    if isinstance(modules, str):
        modules = [modules]
    own = {n for n, _ in model.named_parameters()}  # a tied weight is listed once, by its owner
    out = []
    for name, mod in model.named_modules():
        if not is_linear(mod) or not mod.weight.requires_grad:  # type: ignore[union-attr]
            continue
        if (f"{name}.weight" if name else "weight") not in own:
            continue
        if modules is not None and not any(
            name == m or name.startswith(m.rstrip(".") + ".") for m in modules
        ):
            continue
        out.append(name)
    if not out:
        raise InputError(
            f"no trainable nn.Linear (or Conv1D) module matches modules={modules!r}: K-FAC/EK-FAC "
            "factors cover linear layers (name them by prefix, e.g. modules=['transformer.h.3'])"
        )
    return out


def _blocks(model: nn.Module, names: Sequence[str], params: Sequence[str]) -> list[ModuleBlock]:
    """The module blocks of ``names`` laid out in the order of the flat gradient's ``params``."""
    named = dict(model.named_parameters())
    offsets, pos = {}, 0
    for p in params:
        offsets[p] = pos
        pos += named[p].numel()
    mods = dict(model.named_modules())
    out = []
    for n in names:
        m = mods[n]
        b = getattr(m, "bias", None)
        bias = isinstance(b, Tensor) and b.requires_grad
        d_in, d_out, transposed = _dims(m)
        out.append(
            ModuleBlock(
                n,
                d_in,
                d_out,
                bias,
                offsets[f"{n}.weight" if n else "weight"],
                offsets[f"{n}.bias" if n else "bias"] if bias else -1,
                transposed,
            )
        )
    return out


def _param_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    mods = dict(model.named_modules())
    out = []
    for n in names:
        pre = f"{n}." if n else ""
        out.append(pre + "weight")
        b = mods[n].bias  # type: ignore[union-attr]
        if b is not None and b.requires_grad:
            out.append(pre + "bias")
    order = [n for n, _ in model.named_parameters()]
    return sorted(out, key=order.index)


def _is_lm(data: Examples) -> bool:
    shapes = data.example_shapes()
    return len(shapes) == 3 and shapes[0][1] == "int64"


def _sampler(seed: int, start: int) -> torch.Generator:
    """The label sampler of the batch starting at ``start`` (the same after a resume)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(start))


def _batch_loss(
    model: nn.Module, batch: Sequence[Tensor], lm: bool, fisher: str, gen: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    """Summed cross-entropy of a batch (labels drawn from the model for the true Fisher)
    and the attention mask ``[B, T]`` of a sequence model (None for a classifier)."""
    if lm:
        ids, mask, answer = batch[0], batch[1], batch[2]
        out = model(input_ids=ids, attention_mask=mask)
        logits = (out.logits if hasattr(out, "logits") else out[0])[:, :-1]  # [B, T-1, V]
        w = answer[:, 1:].to(logits.dtype)
        labels = ids[:, 1:]
        if fisher == "true":
            p = torch.softmax(logits.detach().double(), -1).reshape(-1, logits.shape[-1])
            labels = torch.multinomial(p, 1, generator=gen).reshape(labels.shape)
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        )
        return (ce.reshape(w.shape) * w).sum(), mask
    x, y = batch[0], batch[1]
    logits = model(x)
    if fisher == "true":
        y = torch.multinomial(torch.softmax(logits.detach().double(), -1), 1, generator=gen)[:, 0]
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum"), None


class _Capture:
    """Forward/backward hooks that keep each tracked module's input and output gradient."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.acts: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}
        self.handles = []
        mods = dict(model.named_modules())
        for n in names:
            self.handles.append(mods[n].register_forward_hook(self._hook(n)))

    def _hook(self, name: str) -> Any:
        def fwd(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
            self.acts[name] = inp[0].detach()
            if out.requires_grad:

                def bwd(g: Tensor) -> None:
                    self.grads[name] = g.detach()

                out.register_hook(bwd)

        return fwd

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _flat_with_bias(
    a: Tensor, g: Tensor, mask: Tensor | None, bias: bool
) -> tuple[Tensor, Tensor, float]:
    """Positions flattened: activations ``[n, d_in(+1)]`` (masked, bias column),
    gradients ``[n, d_out]``, and the number of counted positions."""
    a2 = a.reshape(-1, a.shape[-1]).double()
    g2 = g.reshape(-1, g.shape[-1]).double()
    if mask is not None and a2.shape[0] == mask.numel():
        m = mask.reshape(-1, 1).double()
        a2 = a2 * m
        g2 = g2 * m
        ones, count = m, float(m.sum())
    else:
        ones, count = torch.ones(a2.shape[0], 1, dtype=a2.dtype), float(a2.shape[0])
    if bias:
        a2 = torch.cat([a2, ones], dim=1)
    return a2, g2, count


def _example_grads(a: Tensor, g: Tensor, mask: Tensor | None, bias: bool) -> Tensor:
    """Per-example weight gradients ``[B, d_out, d_in(+1)]`` (summed over tokens)."""
    a, g = a.double(), g.double()
    if a.dim() == 2:
        a, g = a[:, None], g[:, None]
    if mask is not None and a.shape[:2] == mask.shape:
        m = mask.to(a.dtype)[..., None]
        a, g = a * m, g * m
    if bias:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return torch.einsum("bto,bti->boi", g, a)


def _factor_tag(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _unwrap(model: Any) -> tuple[nn.Module, str | None]:
    if hasattr(model, "model") and hasattr(model, "adapter"):  # an attrlab.LM
        return model.model, getattr(model, "name", None)
    return model, None


def fit_factors(
    model: nn.Module,
    data: Examples | Sequence[Tensor],
    path: str | Path,
    strategy: str = "ekfac",
    fisher: str = "true",
    modules: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    shard_size: int = 4096,
    model_id: str | None = None,
    mode: str = "auto",
    progress: bool = False,
    output: ModelOutput | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> FeatureStore:
    """Fit K-FAC / EK-FAC factors of ``model`` on ``data`` into the store at ``path`` (resuming).

    Three resumable stages, each per shard of ``shard_size`` examples: the
    training-loss gradients of the tracked modules (the store's features:
    ``grad log p(y|x)``, i.e. minus the loss gradient, raw), the covariances
    ``A`` and ``S``, and (EK-FAC) the eigenvalue corrections ``Λ``. Every batch
    starts at a fixed offset inside its shard and draws its labels from its own
    seeded sampler, so a resumed run writes bit-identical factors.

    Args:
        model: a classifier ``model(x) -> logits`` or a causal LM (an ``attrlab.LM``
            is unwrapped), in eval mode.
        data: ``(x, y)`` tensors or :class:`~attrlab.data.featurize.Examples` (from
            :meth:`Examples.from_texts` for a causal LM: the loss covers the scored tokens).
        path: store directory.
        strategy: ``"ekfac"`` (eigenvalue-corrected) or ``"kfac"`` (no corrections;
            an EK-FAC fit serves K-FAC too).
        fisher: ``"true"`` (labels sampled from the model, Kronfluence's default)
            or ``"empirical"`` (the data's labels).
        modules: module-name prefixes of the ``nn.Linear`` layers to track (default: all).
        seed: seed of the label sampler (``fisher="true"``).
        batch_size, shard_size: examples per batch / per shard file.
        mode: gradient mode of the featurizer (see :class:`GradientFeaturizer`).
        progress: show progress bars.
        output: the training-side gradient stored and scored against (default:
            :class:`ClassLogProb` / :class:`AnswerLogProb`, minus the loss: exact
            influence). :class:`AnswerMargin` gives TRAK's training-side function
            (its gradient does not vanish on memorized tokens) with the same
            curvature — a documented departure from the influence function.
        rank, world_size: this process's share (default: from ``torch.distributed``
            if a process group is initialized, e.g. under ``torchrun``, else the
            whole set). Rank ``r`` computes every stage for the shards ``j`` with
            ``j % world_size == r`` and writes them into the shared store; rank 0
            sums the covariance shards (in shard order, as a single process does)
            and eigendecomposes, then writes the fit's index entry. Between the
            stages the ranks wait for each other (``torch.distributed`` barriers,
            or, without a process group, by polling the store for the other
            ranks' files). The files equal a single-process fit's byte for byte.

    Raises:
        InputError: unknown ``strategy`` / ``fisher``, no linear module, bad sizes,
            or (ranks without a process group) the other ranks' files did not
            appear within :data:`RANK_WAIT` seconds.
        StoreMismatchError: ``path`` holds a store for another model or dataset.
        NonFiniteError: a factor is NaN/inf (nothing is written for that shard).

    Example:
        >>> import tempfile, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> s = fit_factors(net, (torch.randn(10, 3), torch.randint(0, 2, (10,))), tempfile.mkdtemp())
        >>> [f["strategy"] for f in Influence(s).fits()]
        ['ekfac']
    """
    from .distributed import dist_info

    model, name = _unwrap(model)
    model_id = model_id or name
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if fisher not in FISHERS:
        raise InputError(f"fisher must be 'true' (sampled labels) or 'empirical', got {fisher!r}")
    if not isinstance(data, Examples):
        data = Examples(data)
    if batch_size <= 0 or shard_size <= 0:
        raise InputError("batch_size and shard_size must be positive")
    if len(data) == 0:
        raise InputError("no training examples")
    r, w, use_dist = dist_info(rank, world_size)
    names = linear_modules(model, modules)
    params = _param_names(model, names)
    lm = _is_lm(data)
    model.eval()
    store = featurize(
        model,
        data,
        path,
        output=output or (AnswerLogProb() if lm else ClassLogProb()),
        proj_dim=None,
        modules=params,
        batch_size=batch_size,
        shard_size=shard_size,
        model_id=model_id,
        rank=rank,
        world_size=world_size,
        finalize=False,
        mode=mode,
        progress=progress,
    )
    blocks = _blocks(model, names, store.manifest["params"])
    config = {
        "modules": [[b.name, b.d_in, b.d_out, b.bias, b.transposed] for b in blocks],
        "fisher": fisher,
        "seed": int(seed) if fisher == "true" else None,
        "batch_size": batch_size,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    tag = _factor_tag(config)
    root = f"factors/{tag}"
    planned = store.planned()
    mine = [rng for j, rng in enumerate(planned) if j % w == r]
    fit = _Fit(model, data, store, blocks, lm, fisher, seed, batch_size, root, progress, mine)

    def have(kind: str) -> Any:
        rels = [f"{root}/{kind}-{a:09d}-{b:09d}.npy" for a, b in planned]
        return lambda: _recorded(store, rels)

    fit.covariances()
    _await_ranks(store, have("cov"), use_dist, w, "covariance shards")
    if r == 0:
        fit.eigen()
    _await_ranks(store, lambda: _recorded(store, [f"{root}/eigen.npy"]), use_dist, w, "eigen.npy")
    if strategy == "ekfac":
        fit.lambdas()
        _await_ranks(store, have("lambda"), use_dist, w, "eigenvalue-correction shards")
    feature_rels = [rel for rng in planned for rel in store._rels(*rng)]
    _await_ranks(store, lambda: _recorded(store, feature_rels), use_dist, w, "gradient shards")

    def indexed() -> bool:
        entry = _read_index(store).get(tag)
        return entry is not None and (strategy == "kfac" or entry["strategy"] == "ekfac")

    if r == 0:
        index = _read_index(store)  # read now: another fit may have been recorded meanwhile
        if tag not in index:
            index[tag] = {**config, "tag": tag, "strategy": "kfac"}
        if strategy == "ekfac":
            index[tag]["strategy"] = "ekfac"
        store.write_file("factors/index.json", json.dumps(index, sort_keys=True).encode())
    _await_ranks(store, indexed, use_dist, w, "factors/index.json")
    return store


def _recorded(store: FeatureStore, rels: Sequence[str]) -> bool:
    """Whether every file of ``rels`` is recorded in the store with its size (one manifest read)."""
    store._reload()
    return all(store._problem(rel) is None for rel in rels)


def _await_ranks(
    store: FeatureStore, ready: Any, use_dist: bool, world_size: int, what: str
) -> None:
    """Wait until ``ready()`` (the other ranks wrote their part of a stage).

    One process: ``ready()`` already holds (it computed everything itself).
    Under ``torch.distributed``: a barrier, after which it must hold. Ranks
    without a process group poll the store.
    """
    if use_dist:
        import torch.distributed as dist

        dist.barrier()
        if not ready():
            raise InputError(f"{store.path}: {what} missing after every rank finished the stage")
        return
    deadline = time.monotonic() + RANK_WAIT
    while not ready():
        if world_size == 1:
            raise InputError(f"{store.path}: {what} missing after the stage that writes them")
        if time.monotonic() > deadline:
            raise InputError(
                f"{store.path}: the other ranks' {what} did not appear within {RANK_WAIT:.0f} s: "
                "start every rank 0..world_size-1 on this store (a rerun resumes)"
            )
        time.sleep(0.05)


def _read_index(store: FeatureStore) -> dict[str, Any]:
    raw = store.read_file("factors/index.json")
    return json.loads(raw) if raw is not None else {}


class _Fit:
    """The factor stages of :func:`fit_factors` on one store."""

    def __init__(
        self,
        model: nn.Module,
        data: Examples,
        store: FeatureStore,
        blocks: list[ModuleBlock],
        lm: bool,
        fisher: str,
        seed: int,
        batch_size: int,
        root: str,
        progress: bool,
        mine: Sequence[tuple[int, int]] | None = None,
    ):
        self.model, self.data, self.store, self.blocks = model, data, store, blocks
        self.lm, self.fisher, self.seed, self.bs = lm, fisher, seed, batch_size
        self.root, self.progress = root, progress
        self.mine = set(mine) if mine is not None else None  # this rank's shards
        self.weights = [dict(model.named_modules())[b.name].weight for b in blocks]

    def _passes(self, kind: str) -> Any:
        """Yield ``(a, b, [(activations, gradients, mask) per batch])`` for missing shards."""
        todo = [
            (a, b)
            for a, b in self.store.planned()
            if (self.mine is None or (a, b) in self.mine)
            and not self.store.has_file(f"{self.root}/{kind}-{a:09d}-{b:09d}.npy")
        ]
        bar = tqdm(
            total=sum(b - a for a, b in todo), disable=not self.progress, desc=kind, unit="ex"
        )
        cap = _Capture(self.model, [b.name for b in self.blocks])
        try:
            for a, b in todo:

                def batches(a: int = a, b: int = b) -> Any:
                    for s in range(a, b, self.bs):
                        e = min(b, s + self.bs)
                        cap.acts.clear()
                        cap.grads.clear()
                        with torch.enable_grad():
                            loss, mask = _batch_loss(
                                self.model,
                                self.data.batch(s, e),
                                self.lm,
                                self.fisher,
                                _sampler(self.seed, s),
                            )
                            torch.autograd.grad(loss, self.weights, allow_unused=True)
                        bar.update(e - s)
                        # a module the batch did not reach (e.g. an unrouted expert) adds nothing
                        yield [
                            (cap.acts[m.name], cap.grads[m.name], mask)
                            if m.name in cap.acts and m.name in cap.grads
                            else None
                            for m in self.blocks
                        ]

                yield a, b, batches()
        finally:
            cap.remove()
            bar.close()

    def _write(self, rel: str, parts: list[np.ndarray]) -> None:
        flat = np.concatenate([p.reshape(-1) for p in parts])
        if not np.isfinite(flat).all():
            raise NonFiniteError(
                f"non-finite Kronecker factors for {rel}: the model's loss or its gradient is "
                "NaN/inf on these examples; nothing was written"
            )
        self.store.write_array(rel, flat)

    def covariances(self) -> None:
        for a, b, batches in self._passes("cov"):
            acc_a = [torch.zeros(m.d_in1, m.d_in1, dtype=torch.float64) for m in self.blocks]
            acc_s = [torch.zeros(m.d_out, m.d_out, dtype=torch.float64) for m in self.blocks]
            counts = np.zeros(2 * len(self.blocks))
            for per in batches:
                for j, (m, got) in enumerate(zip(self.blocks, per)):
                    if got is None:
                        continue
                    act, grad, mask = got
                    a2, g2, c = _flat_with_bias(act, grad, mask, m.bias)
                    acc_a[j].addmm_(a2.T, a2)
                    acc_s[j].addmm_(g2.T, g2)
                    counts[2 * j] += c
                    counts[2 * j + 1] += c
            parts = [t.numpy() for pair in zip(acc_a, acc_s) for t in pair]
            self._write(f"{self.root}/cov-{a:09d}-{b:09d}.npy", [*parts, counts])

    def eigen(self) -> None:
        rel = f"{self.root}/eigen.npy"
        if self.store.has_file(rel):
            return
        cov = covariances_of(self.store, self.blocks, self.root)
        parts = []
        for a_mat, s_mat in cov:
            for c in (a_mat, s_mat):
                e, q = torch.linalg.eigh(torch.from_numpy(c))
                parts += [e.numpy(), q.numpy()]
        self._write(rel, parts)

    def lambdas(self) -> None:
        eig = eigen_of(self.store, self.blocks, self.root)
        for a, b, batches in self._passes("lambda"):
            acc = [torch.zeros(m.d_out, m.d_in1, dtype=torch.float64) for m in self.blocks]
            for per in batches:
                for j, (m, got) in enumerate(zip(self.blocks, per)):
                    if got is None:
                        continue
                    act, grad, mask = got
                    g = _example_grads(act, grad, mask, m.bias)  # [B, out, in1]
                    _, qa, _, qs = eig[j]
                    acc[j] += (qs.T @ g @ qa).square().sum(0)
            self._write(f"{self.root}/lambda-{a:09d}-{b:09d}.npy", [t.numpy() for t in acc])


def _split(flat: np.ndarray, shapes: list[tuple[int, ...]], rel: str) -> list[np.ndarray]:
    want = sum(int(np.prod(s)) for s in shapes)
    if flat.shape != (want,):
        raise InputError(f"{rel} holds {flat.shape} values, the module layout needs {want}")
    out, pos = [], 0
    for s in shapes:
        k = int(np.prod(s))
        out.append(flat[pos : pos + k].reshape(s))
        pos += k
    return out


def _need(store: FeatureStore, rel: str) -> np.ndarray:
    arr = store.read_array(rel)
    if arr is None:
        raise InputError(
            f"{store.path} has no factor file {rel}: run attrlab.data.fit_factors(...) on it "
            "(with strategy='ekfac' for EK-FAC); it resumes where it stopped"
        )
    return arr


def covariances_of(
    store: FeatureStore, blocks: list[ModuleBlock], root: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(A [d_in+1, d_in+1], S [d_out, d_out])]`` per module: shard sums over counts, symmetrized."""
    shapes: list[tuple[int, ...]] = []
    for m in blocks:
        shapes += [(m.d_in1, m.d_in1), (m.d_out, m.d_out)]
    shapes.append((2 * len(blocks),))
    sums = [np.zeros(s) for s in shapes]
    for a, b in store.planned():
        rel = f"{root}/cov-{a:09d}-{b:09d}.npy"
        for acc, part in zip(sums, _split(_need(store, rel), shapes, rel)):
            acc += part
    counts = sums[-1]
    out = []
    for j in range(len(blocks)):
        pair = []
        for k in (0, 1):
            c = sums[2 * j + k] / max(counts[2 * j + k], 1.0)
            pair.append(0.5 * (c + c.T))
        out.append((pair[0], pair[1]))
    return out


def eigen_of(
    store: FeatureStore, blocks: list[ModuleBlock], root: str
) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``[(e_A, Q_A, e_S, Q_S)]`` per module (float64)."""
    shapes: list[tuple[int, ...]] = []
    for m in blocks:
        shapes += [(m.d_in1,), (m.d_in1, m.d_in1), (m.d_out,), (m.d_out, m.d_out)]
    rel = f"{root}/eigen.npy"
    parts = [torch.from_numpy(p.copy()) for p in _split(_need(store, rel), shapes, rel)]
    return [tuple(parts[4 * j : 4 * j + 4]) for j in range(len(blocks))]  # type: ignore[misc]


def _store(store: StoreLike) -> FeatureStore:
    if isinstance(store, FeatureStore):
        return store
    if not isinstance(store, (str, Path)):
        raise InputError(f"give a feature store (path or FeatureStore), got {type(store).__name__}")
    return FeatureStore.open(store)


class Influence:
    """K-FAC / EK-FAC influence scores from a store written by :func:`fit_factors`.

    Args:
        store: the store (path or object).
        strategy: ``"ekfac"`` or ``"kfac"``.
        damping: added to the (corrected) eigenvalues; ``None`` uses Kronfluence's
            heuristic ``0.1 * mean(eigenvalues)`` per module (Kronfluence's own
            default is ``damping_factor=1e-8``: pass ``damping=1e-8`` to match it).
        fit: which fit of the store (its tag, see :meth:`fits`) when it holds several.
        query_rank: keep, per module and query, only the rank-``query_rank``
            truncated SVD of the preconditioned query gradient ``H^-1 grad f``
            (a ``[d_out, d_in+1]`` matrix), as two thin factors
            ``[d_out, r]`` and ``[r, d_in+1]`` — Kronfluence's
            ``query_gradient_low_rank``: memory for many queries. ``None``
            (default) keeps the full matrices; a rank ``>= min(d_out, d_in+1)``
            reproduces the exact scores up to float64 round-off. Applies to
            :meth:`scores` / :meth:`attribute` / :meth:`scores_from_gradients`.

    Raises:
        InputError: unknown strategy, negative damping, ``query_rank < 1``, a
            store without factors (or with K-FAC factors only, for ``strategy="ekfac"``).

    Example:
        >>> Influence.__name__
        'Influence'
    """

    def __init__(
        self,
        store: StoreLike,
        strategy: str = "ekfac",
        damping: float | None = None,
        fit: str | None = None,
        query_rank: int | None = None,
    ):
        if strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if damping is not None and (not np.isfinite(damping) or damping < 0):
            raise InputError(f"damping must be None (heuristic) or a number >= 0, got {damping!r}")
        if query_rank is not None and (
            isinstance(query_rank, bool)
            or not isinstance(query_rank, (int, np.integer))
            or query_rank < 1
        ):
            raise InputError(
                f"query_rank must be None (full query gradients) or an integer >= 1, got {query_rank!r}"
            )
        self.store = _store(store)
        self.strategy = strategy
        self.damping = damping
        self.query_rank = None if query_rank is None else int(query_rank)
        index = _read_index(self.store)
        if not index:
            raise InputError(
                f"{self.store.path} holds no Kronecker factors: run attrlab.data.fit_factors(...)"
            )
        if fit is None:
            fits = [t for t, f in index.items() if strategy == "kfac" or f["strategy"] == "ekfac"]
            if not fits:
                raise InputError(
                    f"{self.store.path} holds K-FAC factors only: run "
                    "attrlab.data.fit_factors(..., strategy='ekfac') on it (it reuses them)"
                )
            if len(fits) > 1:
                raise InputError(f"{self.store.path} holds several fits {fits}: pass fit=<tag>")
            fit = fits[0]
        if fit not in index:
            raise InputError(f"no fit {fit!r} in {self.store.path} (it has {sorted(index)})")
        if strategy == "ekfac" and index[fit]["strategy"] != "ekfac":
            raise InputError(f"fit {fit} has no EK-FAC corrections: fit_factors(strategy='ekfac')")
        self.fit = index[fit]
        self.root = f"factors/{fit}"
        self._pre: list[tuple[Tensor, Tensor, Tensor]] | None = None
        self._blocks: list[ModuleBlock] | None = None

    def fits(self) -> list[dict[str, Any]]:
        """The factor fits recorded in the store (config and tag of each)."""
        return list(_read_index(self.store).values())

    def params(self) -> dict[str, Any]:
        p = {
            "strategy": self.strategy,
            "damping": self.damping,
            "fisher": self.fit["fisher"],
            "fit": self.fit["tag"],
        }
        if self.query_rank is not None:
            p["query_rank"] = self.query_rank
        return p

    @property
    def blocks(self) -> list[ModuleBlock]:
        """The tracked modules in the store's flat gradient layout."""
        if self._blocks is None:
            offsets, pos = {}, 0
            named_sizes = self._param_sizes()
            for p in self.store.manifest["params"]:
                offsets[p] = pos
                pos += named_sizes[p]
            out = []
            for name, d_in, d_out, bias, transposed in self.fit["modules"]:
                pre = f"{name}." if name else ""
                out.append(
                    ModuleBlock(
                        name,
                        d_in,
                        d_out,
                        bias,
                        offsets[pre + "weight"],
                        offsets[pre + "bias"] if bias else -1,
                        transposed,
                    )
                )
            self._blocks = out
        return self._blocks

    def _param_sizes(self) -> dict[str, int]:
        sizes = {}
        for name, d_in, d_out, bias, _ in self.fit["modules"]:
            pre = f"{name}." if name else ""
            sizes[pre + "weight"] = d_in * d_out
            if bias:
                sizes[pre + "bias"] = d_out
        if sum(sizes.values()) != self.store.dim:
            raise InputError(f"the factor fit does not match the store's {self.store.dim} params")
        return sizes

    def _preconditioner(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``[(Q_A, Q_S, 1 / (eigenvalues + damping) [d_out, d_in+1])]`` per module."""
        if self._pre is None:
            eig = eigen_of(self.store, self.blocks, self.root)
            lam: list[Tensor] = []
            if self.strategy == "ekfac":
                shapes: list[tuple[int, ...]] = [(m.d_out, m.d_in1) for m in self.blocks]
                sums = [np.zeros(s) for s in shapes]
                for a, b in self.store.planned():
                    rel = f"{self.root}/lambda-{a:09d}-{b:09d}.npy"
                    for acc, part in zip(sums, _split(_need(self.store, rel), shapes, rel)):
                        acc += part
                lam = [torch.from_numpy(s / self.store.n) for s in sums]
            else:
                lam = [torch.outer(es, ea) for ea, _, es, _ in eig]
            pre = []
            for (_, qa, _, qs), lm in zip(eig, lam):
                d = (
                    HEURISTIC_DAMPING_SCALE * float(lm.mean())
                    if self.damping is None
                    else self.damping
                )
                den = lm + d
                # zero curvature and no damping (e.g. a layer no training example
                # reaches, such as a vision tower under text): a pseudo-inverse
                inv = torch.where(den > 0, 1.0 / den.clamp_min(1e-300), torch.zeros_like(den))
                pre.append((qa, qs, inv))
            self._pre = pre
        return self._pre

    def precondition(self, grads: Tensor) -> Tensor:
        """``H^-1 g`` for flat gradients ``[m, P]`` (float64), module by module in the eigenbasis.

        Example:
            >>> import tempfile, torch
            >>> net = torch.nn.Linear(3, 2)
            >>> s = fit_factors(net, (torch.randn(8, 3), torch.randint(0, 2, (8,))), tempfile.mkdtemp())
            >>> Influence(s).precondition(torch.randn(4, 8)).shape
            torch.Size([4, 8])
        """
        if grads.dim() != 2 or grads.shape[1] != self.store.dim:
            raise InputError(
                f"gradients of shape {tuple(grads.shape)} for a store of {self.store.dim} parameters"
            )
        g = grads.to(torch.float64)
        out = torch.zeros_like(g)
        for m, (qa, qs, inv) in zip(self.blocks, self._preconditioner()):
            mat = m.matrix(g)  # [q, out, in1]
            rot = qs.T @ mat @ qa
            m.scatter(qs @ (rot * inv) @ qa.T, out)
        return out

    def low_rank(self, grads: Tensor, rank: int) -> list[tuple[Tensor, Tensor]]:
        """Per module, the rank-``rank`` truncated SVD of each preconditioned query gradient.

        Returns ``[(U_r diag(s_r) [m, d_out, r], V_r^T [m, r, d_in+1])]`` (float64,
        ``r = min(rank, d_out, d_in+1)``) whose products approximate the module
        matrices of :meth:`precondition` ``(grads)``. Module by module: the full
        preconditioned gradient is never held at once.

        Example:
            >>> import tempfile, torch
            >>> net = torch.nn.Linear(3, 2)
            >>> s = fit_factors(net, (torch.randn(8, 3), torch.randint(0, 2, (8,))), tempfile.mkdtemp())
            >>> [(tuple(u.shape), tuple(v.shape)) for u, v in Influence(s).low_rank(torch.randn(4, 8), 1)]
            [((4, 2, 1), (4, 1, 4))]
        """
        if grads.dim() != 2 or grads.shape[1] != self.store.dim:
            raise InputError(
                f"gradients of shape {tuple(grads.shape)} for a store of {self.store.dim} parameters"
            )
        if rank < 1:
            raise InputError(f"rank must be >= 1, got {rank}")
        g = grads.to(torch.float64)
        out: list[tuple[Tensor, Tensor]] = []
        for m, (qa, qs, inv) in zip(self.blocks, self._preconditioner()):
            pre = qs @ ((qs.T @ m.matrix(g) @ qa) * inv) @ qa.T  # [m, out, in1]
            u, sv, vh = torch.linalg.svd(pre, full_matrices=False)
            k = min(rank, sv.shape[-1])
            out.append(((u[..., :k] * sv[..., None, :k]).contiguous(), vh[..., :k, :].contiguous()))
        return out

    def _low_rank_block(self, factors: list[tuple[Tensor, Tensor]], rows: Tensor) -> Tensor:
        """Scores ``[m, R]`` of training rows ``[R, P]`` against low-rank query factors:
        ``sum_k u_k^T G v_k`` per module, in query chunks of bounded memory."""
        out = torch.zeros(factors[0][0].shape[0], rows.shape[0], dtype=torch.float64)
        for m, (u, vh) in zip(self.blocks, factors):
            g = m.matrix(rows)  # [R, out, in1]
            k = u.shape[-1]
            small = min(m.d_out, m.d_in1)
            step = max(1, LOW_RANK_CHUNK // max(1, rows.shape[0] * k * small))
            for s in range(0, out.shape[0], step):
                uq, vq = u[s : s + step], vh[s : s + step]
                if m.d_in1 >= m.d_out:  # contract the wide input side first
                    t = torch.einsum("roi,qki->qrok", g, vq)  # [q, R, out, k]
                    out[s : s + step] += torch.einsum("qrok,qok->qr", t, uq)
                else:
                    t = torch.einsum("roi,qok->qrki", g, uq)  # [q, R, k, in1]
                    out[s : s + step] += torch.einsum("qrki,qki->qr", t, vq)
        return out

    def query_gradients(
        self,
        model: nn.Module,
        queries: Examples | Sequence[Tensor],
        output: ModelOutput | None = None,
        batch_size: int | None = None,
        check_checkpoint: bool = True,
    ) -> Tensor:
        """Raw gradients ``[m, P]`` (float64) of the measurement ``output`` on the queries.

        Default measurement: :class:`ClassificationMargin` for a classifier,
        :class:`AnswerLogProb` for a causal LM.

        Raises:
            StoreMismatchError: ``model`` is not the checkpoint the store was fitted on.
            InputError: query shapes differ from the training examples'.
        """
        model, _ = _unwrap(model)
        if not isinstance(queries, Examples):
            queries = Examples(queries)
        if len(queries) == 0:
            raise InputError("no queries")
        want = self.store.manifest.get("example_shapes")
        got = queries.example_shapes()
        lm = _is_lm(queries)
        if want is not None and [s[0] for s in want] != [s[0] for s in got] and not lm:
            raise InputError(
                f"query examples have shapes {got} but the training examples in "
                f"{self.store.path} have {want}"
            )
        if check_checkpoint:
            self.store.check({"checkpoint": checkpoint_hash(model)})
        output = output or (AnswerLogProb() if lm else ClassificationMargin())
        feat = GradientFeaturizer(
            model, output, Projector(None), modules=self.store.manifest["params"]
        )
        if feat.names != self.store.manifest["params"]:
            raise InputError("the model's parameters differ from the store's")
        bs = feat.batch_size(queries, batch_size)
        rows = []
        for s in range(0, len(queries), bs):
            grads, _ = feat.grads(*queries.batch(s, min(len(queries), s + bs)))
            rows.append(torch.cat([g.reshape(g.shape[0], -1).double() for g in grads], 1))
        out = torch.cat(rows)
        if not torch.isfinite(out).all():
            raise NonFiniteError("the measurement's gradient is NaN/inf on some query")
        return out

    def scores_from_gradients(self, grads: Tensor, cache: bool = False) -> Tensor:
        """Scores ``[m, N]`` (float64) of query measurement gradients ``[m, P]``.

        ``score[q, i] = grad f_q^T H^-1 grad log p(z_i)`` (minus the training
        loss gradient): the first-order change of ``f_q`` when example ``i`` is
        up-weighted. ``cache=True`` records each shard's block in the store (a
        killed scoring run resumes, giving identical scores). With ``query_rank``
        the preconditioned gradients are held as low-rank factors (:meth:`low_rank`).
        """
        key = None
        if cache:
            h = self._hasher()
            h.update(np.ascontiguousarray(grads.to(torch.float64).numpy()).tobytes())
            key = h.hexdigest()
        if self.query_rank is None:
            return self._score_pass(self.precondition(grads), grads.shape[0], key)
        return self._score_pass(self.low_rank(grads, self.query_rank), grads.shape[0], key)

    def _hasher(self) -> Any:
        """The hash keying cached score blocks, fed with the settings; the caller adds the
        query gradients' float64 bytes (row blocks in order hash like their concatenation)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self.params(), sort_keys=True).encode())
        return h

    def _score_pass(
        self, left: Tensor | list[tuple[Tensor, Tensor]], m: int, key: str | None
    ) -> Tensor:
        """One pass over the training shards: ``[m, N]`` scores of preconditioned query
        gradients ``left`` (``[m, P]``, or the low-rank factors of :meth:`low_rank`)."""
        out = torch.zeros(m, self.store.n, dtype=torch.float64)
        for a, b in self.store.planned():
            rel = f"scores/{key}/{a:09d}-{b:09d}.npy"
            if key is not None:
                got = self.store.read_array(rel, (m, b - a))
                if got is not None:
                    out[:, a:b] = torch.from_numpy(got)
                    continue
            feats = self.store._read_npy(self.store._rels(a, b)[0], (b - a, self.store.dim))
            for r in range(0, b - a, ROWS):  # float64 copies of ROWS training rows at a time
                rows = torch.from_numpy(feats[r : r + ROWS].astype(np.float64))
                if isinstance(left, Tensor):
                    out[:, a + r : a + r + rows.shape[0]] = left @ rows.T
                else:
                    out[:, a + r : a + r + rows.shape[0]] = self._low_rank_block(left, rows)
            del feats
            if key is not None:
                self.store.write_array(rel, out[:, a:b].numpy())
        return out

    def scores(
        self,
        model: nn.Module,
        queries: Examples | Sequence[Tensor],
        output: ModelOutput | None = None,
        batch_size: int | None = None,
        cache: bool = False,
    ) -> Tensor:
        """Scores ``[m, N]`` (float64) of query examples (see :meth:`scores_from_gradients`).

        With ``query_rank`` the query gradients are computed :data:`QUERY_CHUNK`
        queries at a time and only their low-rank factors are kept.
        """
        self.store._require_complete()
        self._preconditioner()  # factor problems surface before the query gradients
        if self.query_rank is None:
            g = self.query_gradients(model, queries, output, batch_size)
            return self.scores_from_gradients(g, cache=cache)
        q = queries if isinstance(queries, Examples) else Examples(queries)
        if len(q) == 0:
            raise InputError("no queries")
        parts: list[list[tuple[Tensor, Tensor]]] = []
        h = self._hasher()
        for s in range(0, len(q), QUERY_CHUNK):
            g = self.query_gradients(
                model, q.batch(s, min(len(q), s + QUERY_CHUNK)), output, batch_size, s == 0
            )
            if cache:
                h.update(np.ascontiguousarray(g.numpy()).tobytes())
            parts.append(self.low_rank(g, self.query_rank))
            del g
        factors = [
            (torch.cat([p[j][0] for p in parts]), torch.cat([p[j][1] for p in parts]))
            for j in range(len(self.blocks))
        ]
        return self._score_pass(factors, len(q), h.hexdigest() if cache else None)

    def attribute(
        self,
        model: nn.Module,
        queries: Examples | Sequence[Tensor],
        output: ModelOutput | None = None,
        texts: Sequence[str] | None = None,
        batch_size: int | None = None,
        cache: bool = False,
    ) -> Attribution:
        """An :class:`~attrlab.result.Attribution` ``[m, N]`` over training examples."""
        from .trak import make_attribution

        t0 = time.perf_counter()
        q = queries if isinstance(queries, Examples) else Examples(queries)
        s = self.scores(model, q, output, batch_size, cache)
        return make_attribution(
            s.to(torch.float32),
            [self.store],
            self.strategy,
            self.params(),
            texts=texts,
            query_texts=q.texts,
            diagnostics={"seconds": time.perf_counter() - t0},
        )

    def token_scores(
        self,
        model: nn.Module,
        queries: Examples | Sequence[Tensor],
        train: Examples,
        output: ModelOutput | None = None,
    ) -> Tensor:
        """Per-token influence ``[m, n, T]`` (float64) of training sequences ``train`` on the queries.

        Entry ``[q, i, t]`` is the part of ``score[q, i]`` carried by position
        ``t`` of document ``i``: per tracked layer, ``g_t^T L_q a_t`` with
        ``a_t`` the layer's input at ``t`` (bias column appended), ``g_t`` the
        gradient of the document's training-side function (the store's
        output, e.g. its log-likelihood) with respect to the layer's output at
        ``t`` and ``L_q = H^-1 grad f(q)`` in module-matrix form. Summed over
        ``t`` it is the document's score (:meth:`scores`), as in Kronfluence's
        ``compute_per_token_scores``. The documents are recomputed (not read
        from the store), so ``train`` may be any rows of the training set.

        Raises:
            InputError: ``train`` is not causal-LM examples, or the store's
                training-side output is not a known one.
        """
        from .outputs import AnswerMargin

        model, _ = _unwrap(model)
        if not _is_lm(train):
            raise InputError("token_scores needs causal-LM training examples (Examples.from_texts)")
        name = self.store.manifest["output"]["name"]
        outputs = {"answer_logprob": AnswerLogProb, "answer_margin": AnswerMargin}
        if name not in outputs:
            raise InputError(f"token_scores needs a causal-LM store, this one scores {name!r}")
        train_out = outputs[name]()
        left = self.precondition(self.query_gradients(model, queries, output))  # [m, P]
        mats = [m.matrix(left) for m in self.blocks]  # [m, out, in1] per module
        cap = _Capture(model, [b.name for b in self.blocks])
        params: dict[str, Tensor] = dict(model.named_parameters())
        weights = [dict(model.named_modules())[b.name].weight for b in self.blocks]
        n, width = len(train), int(train.batch(0, 1)[0].shape[1])
        out = torch.zeros(left.shape[0], n, width, dtype=torch.float64)
        try:
            for i in range(n):
                ex = [t[0] for t in train.batch(i, i + 1)]
                cap.acts.clear()
                cap.grads.clear()
                with torch.enable_grad():
                    value, _ = train_out(model, params, *ex)
                    torch.autograd.grad(value, weights, allow_unused=True)
                for m, lq in zip(self.blocks, mats):
                    if m.name not in cap.acts or m.name not in cap.grads:
                        continue
                    a = cap.acts[m.name][0].double()  # [T, in]
                    g = cap.grads[m.name][0].double()  # [T, out]
                    if m.bias:
                        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
                    out[:, i] += torch.einsum("qoi,to,ti->qt", lq, g, a)
        finally:
            cap.remove()
        return out

    def self_influence(self) -> Tensor:
        """``g_i^T H^-1 g_i`` ``[N]`` (float64) for every training example (no model needed).

        Large values flag examples the model fits against the rest of the data
        (e.g. mislabelled ones).
        """
        out = torch.zeros(self.store.n, dtype=torch.float64)
        for a, feats, _ in self.store.iter_blocks():
            for r in range(0, feats.shape[0], ROWS):
                g = torch.from_numpy(feats[r : r + ROWS].astype(np.float64))
                out[a + r : a + r + g.shape[0]] = (self.precondition(g) * g).sum(1)
        return out


def self_influence(
    store: StoreLike,
    strategy: str = "ekfac",
    damping: float | None = None,
    texts: Sequence[str] | None = None,
) -> Attribution:
    """Self-influence ``g_i^T H^-1 g_i`` of every training example (``[N]``, ``unit_kind="train"``).

    Rank by it to find mislabelled or atypical examples: ``r.top(k)``.

    Example:
        >>> import tempfile, torch
        >>> net = torch.nn.Linear(3, 2)
        >>> s = fit_factors(net, (torch.randn(12, 3), torch.randint(0, 2, (12,))), tempfile.mkdtemp())
        >>> r = self_influence(s)
        >>> r.scores.shape, bool((r.scores >= 0).all())
        (torch.Size([12]), True)
    """
    from .trak import make_attribution

    t0 = time.perf_counter()
    inf = Influence(store, strategy=strategy, damping=damping)
    s = inf.self_influence()
    return make_attribution(
        s.to(torch.float32),
        [inf.store],
        f"self-influence-{strategy}",
        inf.params(),
        texts=texts,
        diagnostics={"seconds": time.perf_counter() - t0},
    )
