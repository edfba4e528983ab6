"""Featurization past one process: ``torchrun`` ranks share a store by shard index.

:func:`attrlab.data.featurize` reads the rank and world size from
``torch.distributed`` when a process group is initialized (gloo on CPU, nccl
on GPUs) and featurizes the shards ``j`` with ``j % world_size == rank``; every
rank writes its own shard files (atomic renames, so ranks never collide).
Then each rank sums ``Phi_s^T Phi_s`` over its shards, the ``[k, k]`` partial
Gram matrices are all-reduced, and rank 0 writes ``gram.npy``. The features
equal a single-process run's exactly, since each shard's batches are the
same. Without a process group the same code runs single-process.

Run the digits example on 2 local processes::

    torchrun --nproc_per_node=2 -m attrlab.data.distributed \
        --model mlp.safetensors --out store/ --examples 20000 --dim 128

:func:`attrlab.data.fit_factors` (K-FAC / EK-FAC influence) runs the same way:
each rank writes the raw gradients, covariance sums and eigenvalue corrections
of its shards; rank 0 sums the covariance shards in shard order and
eigendecomposes, so the factors equal a single process's byte for byte::

    torchrun --nproc_per_node=2 -m attrlab.data.distributed \
        --model mlp.safetensors --out factors/ --factors ekfac

Example:
    >>> dist_info(None, None)
    (0, 1, False)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .store import FeatureStore


def dist_info(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """``(rank, world_size, uses torch.distributed)`` from the arguments or the process group.

    Example:
        >>> dist_info(1, 4)
        (1, 4, False)
    """
    import torch.distributed as dist

    if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    r, w = rank or 0, world_size or 1
    if not 0 <= r < w:
        raise InputError(f"rank {r} is outside world_size {w}")
    return r, w, False


def finalize_distributed(store: FeatureStore, my_ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """All-reduce the partial Gram matrices of every rank's shards; rank 0 writes ``gram.npy``.

    Collective: every rank must call it (after featurizing its shards).
    """
    import torch.distributed as dist

    dist.barrier()  # every rank's shards are on disk
    part = torch.from_numpy(store.partial_gram(list(my_ranges)))
    dist.all_reduce(part, op=dist.ReduceOp.SUM)
    g = part.numpy()
    if dist.get_rank() == 0:
        store.finalize(g)
    dist.barrier()
    store.manifest = FeatureStore.open(store.path).manifest
    return g


def main(argv: Sequence[str] | None = None) -> None:
    """Featurize the digits MLP (a safetensors state dict) into a store, or fit its influence
    factors (``--factors``); works under torchrun."""
    from safetensors.torch import load_file

    from .digits import DigitsMLP, load_digits_data, tiled_examples
    from .featurize import featurize

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--examples",
        type=int,
        default=0,
        help="examples (0 = the digits train split; more = tiled)",
    )
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--factors",
        choices=["ekfac", "kfac"],
        default=None,
        help="fit influence factors (attrlab.data.fit_factors) instead of TRAK features",
    )
    ap.add_argument("--fisher", choices=["true", "empirical"], default="true")
    ap.add_argument("--rank", type=int, default=None, help="without torchrun: this process's rank")
    ap.add_argument("--world-size", type=int, default=None, help="without torchrun: the ranks")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import torch.distributed as dist

    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    model = DigitsMLP(a.hidden)
    model.load_state_dict(load_file(a.model))
    xtr, ytr, _, _ = load_digits_data()
    data = tiled_examples(xtr, ytr, a.examples) if a.examples else (xtr, ytr)
    common: dict[str, Any] = {
        "seed": a.seed,
        "batch_size": a.batch_size,
        "shard_size": a.shard_size,
        "model_id": "digits-mlp",
        "rank": a.rank,
        "world_size": a.world_size,
    }
    if a.factors is not None:
        from .influence import fit_factors

        fit_factors(model, data, a.out, strategy=a.factors, fisher=a.fisher, **common)
    else:
        featurize(model, data, a.out, proj_dim=a.dim, **common)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
