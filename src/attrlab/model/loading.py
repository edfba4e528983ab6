"""Loading and wrapping Hugging Face causal LMs.

Example:
    >>> import attrlab as al
    >>> hf, tok = al.testing.tiny_model("qwen2")
    >>> lm = al.wrap(hf, tok)
    >>> lm.cfg.family
    'qwen2'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, UnsupportedArchitectureError
from .adapters import SUPPORTED_MODEL_TYPES
from .wrapper import LM


def wrap(model: nn.Module, tokenizer: Any = None, name: str | None = None) -> LM:
    """Wrap an already-loaded Hugging Face causal LM (and its tokenizer).

    Raises:
        UnsupportedArchitectureError: the model's family has no adapter.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> lm.cfg.n_layers
        2
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"wrap() takes a torch nn.Module, got {type(model).__name__}")
    return LM(model, tokenizer, name=name)


def load(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    device_map: Any = None,
    attn_implementation: str | None = "eager",
    tokenizer: Any = None,
    **from_pretrained_kwargs: Any,
) -> LM:
    """Load a Hugging Face causal LM by id or local path and wrap it.

    ``dtype`` and ``device_map`` go to ``from_pretrained`` unchanged, so a model
    larger than one device loads with accelerate's dispatch
    (``device_map="auto"``). ``attn_implementation="eager"`` (the default)
    exposes attention patterns; pass ``"sdpa"`` for speed when you do not need them.

    Raises:
        UnsupportedArchitectureError: the checkpoint's family has no adapter.
        InputError: a local path that does not exist.

    Example:
        >>> import attrlab as al, tempfile
        >>> hf, tok = al.testing.tiny_model("llama")
        >>> d = tempfile.mkdtemp(); hf.save_pretrained(d); _ = tok.save_pretrained(d)
        >>> al.load(d).cfg.family
        'llama'
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_local and not Path(name).expanduser().exists():
        raise InputError(f"no model at {name!r}: the path does not exist")
    config = AutoConfig.from_pretrained(name, **_hub_kwargs(from_pretrained_kwargs))
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"attrlab has no adapter for model_type={config.model_type!r} ({name}). "
            f"Supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}. "
            "Adding one is a single small file: see docs/adapters.md."
        )
    kwargs: dict[str, Any] = dict(from_pretrained_kwargs)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if device is not None and device_map is None:
        model.to(device)  # type: ignore[arg-type]
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(name, **_hub_kwargs(from_pretrained_kwargs))
    return LM(model, tokenizer, name=name)


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    keep = ("revision", "cache_dir", "local_files_only", "token", "trust_remote_code")
    return {k: v for k, v in kwargs.items() if k in keep}
