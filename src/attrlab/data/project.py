"""Seeded random projection of per-example gradients, generated chunk by chunk.

The projection ``P`` is a ``[d, k]`` matrix (``d`` = number of parameters,
``k`` = feature dimension) that is never held whole: the rows of every
parameter are cut into chunks of at most ``chunk_rows`` rows, and the block of
``P`` for chunk ``c`` of parameter ``p`` is drawn from a generator seeded by a
hash of ``(seed, p, c)``. A block depends on nothing else, so any process
(another rank, a resumed run) regenerates exactly the same matrix. Entries are
Rademacher (``±1``) or Gaussian, scaled by ``1/sqrt(k)`` so inner products are
preserved in expectation. Blocks may be kept between batches while their total
size stays under ``cache_bytes``; caching never changes the result.

``dim=None`` (kind ``"identity"``) gives the raw gradients (for exactness
tests and small models).

Example:
    >>> import torch
    >>> from attrlab.data.project import Projector
    >>> p = Projector(dim=8, seed=0)
    >>> grads = [torch.randn(3, 5, 4), torch.randn(3, 4)]   # per-example grads of 2 params
    >>> p.project(grads).shape
    torch.Size([3, 8])
    >>> bool(torch.equal(p.project(grads), Projector(dim=8, seed=0).project(grads)))
    True
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError

KINDS = ("rademacher", "gaussian", "identity")


def block_seed(seed: int, param: int, chunk: int) -> int:
    """The generator seed of one projection block, derived from ``(seed, param, chunk)``.

    Example:
        >>> block_seed(0, 0, 0) == block_seed(0, 0, 0) != block_seed(0, 0, 1)
        True
    """
    h = hashlib.blake2b(f"attrlab-proj:{seed}:{param}:{chunk}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


class Projector:
    """A seeded ``[d, k]`` random projection applied to per-parameter gradients.

    Args:
        dim: feature dimension ``k``; ``None`` keeps the raw gradient (identity).
        seed: projection seed (stored in the feature store's manifest).
        kind: ``"rademacher"`` (default) or ``"gaussian"``; ``"identity"`` if ``dim`` is None.
        chunk_rows: rows of ``P`` generated at once (memory of one block: ``chunk_rows * k * 4`` bytes).
        cache_bytes: keep generated blocks between calls while their total stays below this.

    Example:
        >>> import torch
        >>> Projector(dim=None).project([torch.ones(2, 3)]).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        dim: int | None = 512,
        seed: int = 0,
        kind: str = "rademacher",
        chunk_rows: int = 8192,
        cache_bytes: int = 256 * 2**20,
    ):
        if dim is None:
            kind = "identity"
        if kind not in KINDS:
            raise InputError(f"projection kind must be one of {KINDS}, got {kind!r}")
        if kind != "identity" and (not isinstance(dim, int) or dim <= 0):
            raise InputError(f"projection dim must be a positive int or None, got {dim!r}")
        if chunk_rows <= 0:
            raise InputError("chunk_rows must be positive")
        self.dim = None if kind == "identity" else dim
        self.seed = int(seed)
        self.kind = kind
        self.chunk_rows = int(chunk_rows)
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[tuple[int, int, int], Tensor] = {}
        self._cached_bytes = 0

    @classmethod
    def from_spec(cls, spec: dict[str, Any], cache_bytes: int = 256 * 2**20) -> Projector:
        """The projector a :meth:`spec` (e.g. a feature store's ``projection``) describes.

        Example:
            >>> p = Projector(dim=8, seed=3)
            >>> Projector.from_spec(p.spec()).spec() == p.spec()
            True
        """
        return cls(
            spec["dim"],
            seed=spec["seed"],
            kind=spec["kind"],
            chunk_rows=spec["chunk_rows"],
            cache_bytes=cache_bytes,
        )

    def spec(self) -> dict[str, Any]:
        """What determines the projection (stored in and checked against manifests)."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "chunk_rows": self.chunk_rows,
        }

    def out_dim(self, d: int) -> int:
        """Feature dimension for ``d`` parameters."""
        return d if self.dim is None else self.dim

    def block(self, param: int, chunk: int, rows: int) -> Tensor:
        """Block ``[rows, k]`` of the projection for chunk ``chunk`` of parameter ``param``."""
        assert self.dim is not None
        key = (param, chunk, rows)
        if key in self._cache:
            return self._cache[key]
        g = torch.Generator().manual_seed(block_seed(self.seed, param, chunk))
        k = self.dim
        scale = 1.0 / math.sqrt(k)
        if self.kind == "rademacher":
            b = torch.randint(0, 2, (rows, k), generator=g, dtype=torch.int8).to(torch.float32)
            # {0, 1} -> {-scale, +scale} in one pass; exact (2 * scale - scale == scale)
            b.mul_(2.0 * scale).sub_(scale)
        else:
            b = torch.randn(rows, k, generator=g, dtype=torch.float32)
            b.mul_(scale)
        size = b.numel() * 4
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = b
            self._cached_bytes += size
        return b

    def project(self, grads: Sequence[Tensor]) -> Tensor:
        """Project per-example gradients: one tensor ``[b, *param_shape]`` per parameter → ``[b, k]``.

        Parameters must always come in the same order (their position is part
        of the block seed).
        """
        if not grads:
            raise InputError("no gradients to project")
        b = grads[0].shape[0]
        flat = [g.reshape(b, -1).to(torch.float32) for g in grads]
        if self.dim is None:
            return torch.cat(flat, dim=1)
        out = torch.zeros(b, self.dim, dtype=torch.float32)
        for p, g in enumerate(flat):  # g: [b, n_p]
            n = g.shape[1]
            for c, start in enumerate(range(0, n, self.chunk_rows)):
                stop = min(n, start + self.chunk_rows)
                out.addmm_(g[:, start:stop], self.block(p, c, stop - start))
        return out

    def matrix(self, sizes: Sequence[int]) -> Tensor:
        """The full ``[d, k]`` matrix for parameters of these sizes (tests and small models only)."""
        if self.dim is None:
            return torch.eye(sum(sizes))
        rows = []
        for p, n in enumerate(sizes):
            for c, start in enumerate(range(0, n, self.chunk_rows)):
                rows.append(self.block(p, c, min(n, start + self.chunk_rows) - start))
        return torch.cat(rows, 0)
