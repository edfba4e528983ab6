"""Plumbing shared by attrlab's small trainers (the tuned lens, sparse
dictionaries): texts to equal-length token batches, and resumable checkpoints
(parameters, Adam's state and the step, as safetensors + JSON, never pickle).

Example:
    >>> import random, torch
    >>> seqs = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), torch.tensor([7, 8])]
    >>> sorted(b.shape[1] for b in batches(seqs, 4, random.Random(0)))
    [2, 3]
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._files import write_atomically
from .errors import FileFormatError, InputError

__all__ = [
    "zoo_texts",
    "sequences",
    "batches",
    "batch_stream",
    "lr_schedule",
    "save_checkpoint",
    "resume",
]


def zoo_texts(lm: Any, n: int, seed: int) -> list[str]:
    """``n`` texts of a zoo model's own task (training split: prompt and answer).

    Raises:
        InputError: ``lm`` is not a zoo model.
    """
    name = str(getattr(lm, "name", ""))
    if not name.startswith("zoo/"):
        raise InputError("give texts= (an iterable of strings or token-id lists); only zoo "
                         "models have a task generator to train on")  # fmt: skip
    from . import zoo

    exs = zoo.task(name[4:]).examples(n, seed=seed, split="train")
    return [e.prompt + getattr(e, "answer", "") for e in exs]


def sequences(lm: Any, texts: Iterable[Any], max_len: int) -> list[Tensor]:
    """Token ids per text (strings are tokenized; id lists kept), cut to ``max_len``;
    texts shorter than 2 tokens are dropped.

    Raises:
        InputError: nothing left.
    """
    seqs = []
    for t in texts:
        if isinstance(t, str):
            ids = lm.tokenize(t).input_ids[0]
        else:
            ids = torch.as_tensor(t, dtype=torch.long).reshape(-1)
        ids = ids[:max_len].cpu()
        if len(ids) >= 2:
            seqs.append(ids)
    if not seqs:
        raise InputError("no text of at least 2 tokens to train on")
    return seqs


def batches(seqs: list[Tensor], batch_size: int, rng: random.Random) -> list[Tensor]:
    """Batches of equal-length sequences (no padding), shuffled by ``rng``."""
    by_len: dict[int, list[Tensor]] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(s)
    out = []
    for group in by_len.values():
        rng.shuffle(group)
        out += [torch.stack(group[i : i + batch_size]) for i in range(0, len(group), batch_size)]
    rng.shuffle(out)
    return out


def batch_stream(
    seqs: list[Tensor], batch_size: int, seed: int, start: int = 0
) -> Iterator[Tensor]:
    """Batches forever, reshuffled each pass, the first ``start`` skipped (so a
    resumed run sees the same data as an uninterrupted one).

    Example:
        >>> seqs = [torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([5, 6])]
        >>> a, b = batch_stream(seqs, 2, 0), batch_stream(seqs, 2, 0, start=1)
        >>> _ = next(a); torch.equal(next(a), next(b))
        True
    """
    rng = random.Random(seed)
    order: list[Tensor] = []
    step = 0
    while True:
        if not order:
            order = batches(seqs, batch_size, rng)
        batch = order.pop()
        if step >= start:
            yield batch
        step += 1


def lr_schedule(lr: float, warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``steps``.

    Example:
        >>> f = lr_schedule(1.0, 2, 10)
        >>> [round(f(s), 3) for s in (0, 1, 2, 9)]
        [0.5, 1.0, 1.0, 0.125]
    """

    def at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * max(0.0, (steps - step) / max(1, steps - warmup))

    return at


def save_checkpoint(ck: Path, params: dict[str, Tensor], opt: Any, step: int) -> None:
    """Write ``params``, Adam's moments and ``step`` to directory ``ck`` (atomically).

    Example:
        >>> import tempfile, pathlib
        >>> w = torch.zeros(2, requires_grad=True)
        >>> opt = torch.optim.Adam([w])
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> save_checkpoint(d, {"w": w}, opt, 3)
        >>> resume(d, {"w": w}, opt)
        3
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in params.items()}
    adam_step = 0.0
    for name, p in params.items():
        st = opt.state.get(p)
        if st:
            tensors[f"adam.{name}.exp_avg"] = st["exp_avg"].detach().contiguous().cpu()
            tensors[f"adam.{name}.exp_avg_sq"] = st["exp_avg_sq"].detach().contiguous().cpu()
            adam_step = float(st["step"])
    write_atomically(ck / "checkpoint.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    text = json.dumps({"step": step, "adam_step": adam_step})
    write_atomically(ck / "state.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def resume(ck: Path, params: dict[str, Tensor], opt: Any) -> int:
    """Load a checkpoint written by :func:`save_checkpoint` into ``params`` and
    ``opt``; returns the step to continue from (0 if ``ck`` has none).

    Raises:
        FileFormatError: unreadable files; InputError: the shapes differ (another model).
    """
    if not (ck / "state.json").exists():
        return 0
    try:
        state = json.loads((ck / "state.json").read_text())
        t = load_file(str(ck / "checkpoint.safetensors"))
    except (OSError, ValueError) as e:
        raise FileFormatError(f"cannot resume from {ck}: {e}") from e
    for name, p in params.items():
        if name not in t or t[name].shape != p.shape:
            raise InputError(f"the checkpoint in {ck} is for another model; use a new directory")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(t[name])
            if f"adam.{name}.exp_avg" in t:
                opt.state[p] = {
                    "step": torch.tensor(float(state["adam_step"])),
                    "exp_avg": t[f"adam.{name}.exp_avg"].to(p.device),
                    "exp_avg_sq": t[f"adam.{name}.exp_avg_sq"].to(p.device),
                }
    return int(state["step"])
