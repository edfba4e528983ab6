"""Loading and wrapping Hugging Face causal LMs.

Example:
    >>> import attrlab as al
    >>> hf, tok = al.testing.tiny_model("qwen2")
    >>> lm = al.wrap(hf, tok)
    >>> lm.cfg.family
    'qwen2'
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import FileFormatError, InputError, UnsupportedArchitectureError
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
        InputError: a local path that does not exist, or a hub id that is not in
            the local cache and cannot be downloaded (offline, or no network).
        FileFormatError: a plain file, or a directory without a readable
            ``config.json``, weights or tokenizer.

    Example:
        >>> import attrlab as al, tempfile
        >>> hf, tok = al.testing.tiny_model("llama")
        >>> d = tempfile.mkdtemp(); hf.save_pretrained(d); _ = tok.save_pretrained(d)
        >>> al.load(d).cfg.family
        'llama'
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    hub = _hub_kwargs(from_pretrained_kwargs)
    config = _config(AutoConfig, name, hub)
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
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as e:
        raise _load_error(name, "its weights", e) from e
    if device is not None and device_map is None:
        model.to(device)  # type: ignore[arg-type]
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, **hub)
        except OSError as e:
            raise _load_error(name, "its tokenizer", e) from e
    return LM(model, tokenizer, name=name)


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _offline(hub: dict[str, Any]) -> bool:
    """True when only local files may be used (``local_files_only`` or HF offline mode)."""
    if hub.get("local_files_only"):
        return True
    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    if flag.upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):  # pragma: no cover - a transformers dependency
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so that an uncached model fails in
    seconds instead of after the hub client's retries. True behind a proxy."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = str(constants.ENDPOINT)
    except (ImportError, AttributeError):  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _not_cached(name: str, why: str) -> InputError:
    return InputError(
        f"model {name!r} is not in the local Hugging Face cache and {why}. Download it "
        f"where there is network (`hf download {name}`, or huggingface-cli download), "
        "point HF_HOME or cache_dir= at a cache that holds it, or pass a local directory "
        "written by save_pretrained (config.json, weights and tokenizer files)"
    )


def _config(auto: Any, name: str, hub: dict[str, Any]) -> Any:
    """The model's config: from a local directory, the local cache, or the hub.

    Raises:
        InputError: a missing path, or a hub id that is not cached and cannot be downloaded.
        FileFormatError: a plain file, or a directory without a readable ``config.json``.
    """
    path = Path(name).expanduser()
    if _is_local(name):
        if not path.exists():
            raise InputError(f"no model at {name!r}: the path does not exist")
        if not path.is_dir():
            raise FileFormatError(
                f"{name!r} is a file; al.load takes a directory written by save_pretrained "
                "(config.json, weights and tokenizer files) or a Hugging Face hub id"
            )
        if not (path / "config.json").is_file():
            raise FileFormatError(
                f"{name!r} has no config.json: al.load takes a directory written by "
                "model.save_pretrained(dir) and tokenizer.save_pretrained(dir), or a hub id"
            )
        try:
            return auto.from_pretrained(name, **hub)
        except (OSError, ValueError) as e:
            raise FileFormatError(f"cannot read {path / 'config.json'}: {_first_line(e)}") from e
    try:
        return auto.from_pretrained(name, **{**hub, "local_files_only": True})
    except (OSError, ValueError):
        pass
    if _offline(hub):
        raise _not_cached(
            name, "offline mode (local_files_only / HF_HUB_OFFLINE) forbids a download"
        )
    if not _hub_reachable():
        raise _not_cached(name, "the hub cannot be reached to download it")
    try:
        return auto.from_pretrained(name, **hub)
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot load model {name!r} from the hub: {_first_line(e)}. Check the id "
            "(e.g. 'gpt2', 'Qwen/Qwen2-0.5B'), revision= and token= for a gated model, "
            "or pass a local directory written by save_pretrained"
        ) from e


def _load_error(name: str, what: str, e: Exception) -> Exception:
    """A typed error for a failed ``from_pretrained`` of weights or tokenizer."""
    if _is_local(name):
        return FileFormatError(
            f"cannot load {what} from {name!r}: {_first_line(e)}. The directory must hold "
            "what model.save_pretrained(dir) and tokenizer.save_pretrained(dir) write"
        )
    return _not_cached(name, f"{what} could not be loaded ({_first_line(e)})")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    keep = ("revision", "cache_dir", "local_files_only", "token", "trust_remote_code")
    return {k: v for k, v in kwargs.items() if k in keep}
