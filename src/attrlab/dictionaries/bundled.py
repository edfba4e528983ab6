"""Transcoders bundled with the zoo models: one per layer (``blocks.l.mlp.in ->
blocks.l.mlp.out``), stored in float16 in the SAELens layout under
``attrlab/zoo/transcoders/<task>/layer_{l}/`` with a ``summary.json`` (the
command that trained them, and their FVE, L0 and next-token KL on held-out
task texts). See ``docs/dictionaries.md`` for the numbers and sizes.
:func:`write_transcoder_set` writes such a folder (``attrlab transcoders``
uses it); :func:`heldout_texts` are the texts the numbers are measured on.

Example:
    >>> import attrlab as al
    >>> tcs = al.dictionaries.zoo_transcoders("ioi")
    >>> [d.out_site for d in tcs], tcs[0].W_enc.dtype
    (['blocks.0.mlp.out', 'blocks.1.mlp.out'], torch.float32)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .._files import write_atomically
from ..errors import InputError
from .base import Dictionary
from .io import _load_saelens_set, save_saelens_set
from .train import evaluate

__all__ = [
    "heldout_texts",
    "write_transcoder_set",
    "zoo_transcoders",
    "zoo_transcoders_path",
    "zoo_transcoders_summary",
]

TRANSCODERS_DIR = Path(__file__).resolve().parent.parent / "zoo" / "transcoders"


def zoo_transcoders_path(task: str) -> Path:
    """The folder of the bundled transcoders of zoo task ``task``.

    Raises:
        InputError: unknown task, or none bundled for it.

    Example:
        >>> (zoo_transcoders_path("ioi") / "summary.json").exists()
        True
    """
    from .. import zoo

    if task not in zoo.all_tasks():
        raise InputError(f"no zoo task {task!r}; choose from {', '.join(zoo.all_tasks())}")
    p = TRANSCODERS_DIR / task
    if not any(p.glob("layer_*/cfg.json")):
        raise InputError(
            f"no transcoders are bundled for zoo:{task} (at {p}); train a set with: "
            f"attrlab transcoders zoo:{task}"
        )
    return p


def zoo_transcoders(task: str) -> list[Dictionary]:
    """The bundled per-layer transcoders of zoo model ``task``, in layer order,
    in float32 (stored as float16).

    Raises:
        InputError: unknown task, or none bundled for it.

    Example:
        >>> import attrlab as al
        >>> tcs = zoo_transcoders("induction")
        >>> lm = al.zoo.load("induction")
        >>> len(tcs) == lm.cfg.n_layers, tcs[0].activation
        (True, 'jumprelu')
    """
    return [d.to(torch.float32) for d in _load_saelens_set(zoo_transcoders_path(task))]


def zoo_transcoders_summary(task: str) -> dict[str, Any]:
    """The bundled set's ``summary.json``: the command and settings that trained
    it and per-layer ``fve``, ``l0``, ``kl`` on held-out texts.

    Example:
        >>> s = zoo_transcoders_summary("ioi")
        >>> [row["layer"] for row in s["layers"]]
        [0, 1]
    """
    return dict(json.loads((zoo_transcoders_path(task) / "summary.json").read_text()))


def heldout_texts(task: str, n: int = 256, seed: int = 1) -> list[str]:
    """``n`` texts (prompt + answer) of zoo task ``task``'s test split: what
    the bundled transcoders were not trained on (training uses the train split).

    Example:
        >>> len(heldout_texts("ioi", 3))
        3
    """
    from .. import zoo

    return [e.prompt + getattr(e, "answer", "") for e in zoo.task(task).examples(n, seed=seed)]


def write_transcoder_set(
    lm: Any,
    ds: list[Dictionary],
    path: str | Path,
    texts: list[Any],
    dtype: torch.dtype | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``ds`` as ``path/layer_{l}/`` (SAELens layout, in ``dtype``) and
    ``path/summary.json``: ``info`` plus, per layer, ``fve``, ``l0``, ``kl``,
    ``mse`` of the dictionaries *as stored* (after the ``dtype`` round trip)
    on ``texts``, and the training seconds.

    Returns:
        The summary.

    Example:
        >>> import attrlab as al, tempfile
        >>> lm = al.zoo.load("ioi")
        >>> ds = [Dictionary.random(lm.cfg.d_model, 16, f"blocks.{l}.mlp.in", f"blocks.{l}.mlp.out",
        ...                         activation="topk", k=2) for l in (0, 1)]
        >>> s = write_transcoder_set(lm, ds, tempfile.mkdtemp(), heldout_texts("ioi", 4))
        >>> sorted(s["layers"][0])
        ['fve', 'in_site', 'kl', 'l0', 'layer', 'mse', 'out_site', 'train_seconds']
    """
    rows = []
    for d in ds:
        stored = d.to(dtype).to(torch.float32) if dtype is not None else d
        ev = evaluate(lm, stored, texts)
        layer = int(d.in_site.split(".")[1]) if d.in_site.startswith("blocks.") else -1
        rows.append({"layer": layer, "in_site": d.in_site, "out_site": d.out_site,
                     **{k: round(v, 5) for k, v in ev.items()},
                     "train_seconds": d.meta.get("train_seconds")})  # fmt: skip
    p = save_saelens_set(ds, path, dtype)
    size = sum(f.stat().st_size for f in p.glob("layer_*/*") if f.is_file())
    summary = {**(info or {}), "model": str(getattr(lm, "name", "")),
               "dtype": str(dtype or ds[0].W_enc.dtype).replace("torch.", ""),
               "n_eval_texts": len(texts), "bytes": size, "layers": rows}  # fmt: skip
    text = json.dumps(summary, indent=1)
    write_atomically(p / "summary.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return summary
