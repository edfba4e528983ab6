"""The digits example: scikit-learn's bundled 8x8 digits (no download) and a small MLP.

Used by the tests, the LDS harness example and the TRAK benchmark. Training is
deterministic given ``seed`` (initialization and minibatch order).

Example:
    >>> from attrlab.data.digits import load_digits_data, train_mlp, margins
    >>> xtr, ytr, xte, yte = load_digits_data()
    >>> model = train_mlp(xtr[:200], ytr[:200], epochs=2, seed=0)
    >>> margins(model, xte[:5], yte[:5]).shape
    torch.Size([5])
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .featurize import Examples


@functools.lru_cache(maxsize=2)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def load_digits_data(seed: int = 0, n_test: int = 300) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train [n, 64], y_train [n], x_test [n_test, 64], y_test [n_test])``, standardized, shuffled by ``seed``.

    Example:
        >>> load_digits_data()[0].shape
        torch.Size([1497, 64])
    """
    x, y = _raw()
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)
    return xt[n_test:], yt[n_test:], xt[:n_test], yt[:n_test]


class DigitsMLP(nn.Module):
    """``64 -> hidden -> 10`` MLP with ReLU.

    Example:
        >>> DigitsMLP(16)(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def train_mlp(
    x: Tensor,
    y: Tensor,
    hidden: int = 32,
    epochs: int = 20,
    lr: float = 0.05,
    batch_size: int = 64,
    weight_decay: float = 1e-3,
    seed: int = 0,
    checkpoints: int = 1,
) -> nn.Module | tuple[nn.Module, list[dict[str, Tensor]]]:
    """Train a :class:`DigitsMLP` with minibatch SGD (momentum 0.9); deterministic given ``seed``.

    With ``checkpoints > 1`` returns ``(model, state_dicts)`` saved at evenly
    spaced epochs (the last one is the final model), for TracIn-CP and
    checkpoint ensembles.

    Example:
        >>> xtr, ytr, _, _ = load_digits_data()
        >>> m, cps = train_mlp(xtr[:100], ytr[:100], epochs=2, checkpoints=2)
        >>> len(cps)
        2
    """
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsMLP(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = x.shape[0]
    save_at = {round(epochs * (i + 1) / checkpoints) for i in range(checkpoints)}
    states: list[dict[str, Tensor]] = []
    model.train()
    for ep in range(1, epochs + 1):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if ep in save_at:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model.eval()
    return (model, states) if checkpoints > 1 else model


@torch.no_grad()
def margins(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Classification margins ``log(p_y/(1-p_y))`` ``[n]`` of ``model`` on ``(x, y)``.

    Example:
        >>> margins(DigitsMLP(8), torch.zeros(3, 64), torch.tensor([0, 1, 2])).shape
        torch.Size([3])
    """
    logits = model(x)
    is_y = nn.functional.one_hot(y, logits.shape[-1]).bool()
    correct = logits[is_y]
    others = torch.logsumexp(logits.masked_fill(is_y, float("-inf")), -1)
    return correct - others


def tiled_examples(x: Tensor, y: Tensor, n: int) -> Examples:
    """``n`` examples made lazily from ``(x, y)`` by cycling with a small per-copy scaling.

    Used to measure featurization memory at 10k vs 100k examples without
    holding the data set.

    Example:
        >>> ex = tiled_examples(torch.ones(3, 64), torch.zeros(3, dtype=torch.long), 10)
        >>> len(ex), ex.batch(8, 10)[0].shape
        (10, torch.Size([2, 64]))
    """
    base = x.shape[0]

    def fetch(start: int, stop: int) -> tuple[Tensor, Tensor]:
        idx = torch.arange(start, stop)
        scale = 1.0 + 0.01 * ((idx // base) % 11).float()
        return x[idx % base] * scale[:, None], y[idx % base]

    return Examples(fetch=fetch, n=n)


def digits_harness(
    x_train: Tensor,
    y_train: Tensor,
    x_query: Tensor,
    y_query: Tensor,
    n_models: int = 32,
    alpha: float = 0.5,
    hidden: int = 32,
    epochs: int = 20,
    seed: int = 0,
    cache_dir: str | None = None,
    progress: bool = False,
) -> Any:
    """An :class:`~attrlab.data.lds.LDSHarness` that retrains :class:`DigitsMLP` on subsets and measures query margins.

    Model ``j`` is trained with seed ``seed + 1000 + j``.

    Example:
        >>> xtr, ytr, xte, yte = load_digits_data()
        >>> h = digits_harness(xtr[:60], ytr[:60], xte[:3], yte[:3], n_models=2, epochs=1)
        >>> h.outputs().shape
        (2, 3)
    """
    from .lds import LDSHarness

    def train_and_measure(idx: Any, j: int) -> Any:
        i = torch.as_tensor(idx, dtype=torch.long)
        m = train_mlp(x_train[i], y_train[i], hidden=hidden, epochs=epochs, seed=seed + 1000 + j)
        return margins(m, x_query, y_query).numpy()  # type: ignore[arg-type]

    key = {
        "task": "digits-mlp",
        "hidden": hidden,
        "epochs": epochs,
        "seed": seed,
        "n_query": int(x_query.shape[0]),
        "train_hash": float(x_train.sum()),
        "query_hash": float(x_query.sum()),
    }
    return LDSHarness(
        train_and_measure, int(x_train.shape[0]), n_models, alpha, seed, cache_dir, key, progress
    )
