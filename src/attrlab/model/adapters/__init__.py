"""Architecture adapters: the only place that knows where a family keeps things.

See ``docs/adapters.md`` for how to add a family.

Example:
    >>> from attrlab.model.adapters import SUPPORTED_MODEL_TYPES
    >>> "llama" in SUPPORTED_MODEL_TYPES
    True
"""

from __future__ import annotations

from torch import nn

from ...errors import UnsupportedArchitectureError
from .base import Adapter, ModelConfig
from .gemma import Gemma2Adapter, GemmaAdapter
from .gpt2 import GPT2Adapter
from .gpt_neox import GPTNeoXAdapter
from .llama import LlamaAdapter
from .mistral import MistralAdapter
from .phi3 import Phi3Adapter
from .qwen2 import Qwen2Adapter

ADAPTERS: tuple[type[Adapter], ...] = (
    GPT2Adapter,
    GPTNeoXAdapter,
    LlamaAdapter,
    MistralAdapter,
    Qwen2Adapter,
    GemmaAdapter,
    Gemma2Adapter,
    Phi3Adapter,
)
SUPPORTED_MODEL_TYPES: dict[str, type[Adapter]] = {t: a for a in ADAPTERS for t in a.model_types}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a Hugging Face causal LM, by its ``config.model_type``.

    Raises:
        UnsupportedArchitectureError: no adapter for that model type.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = SUPPORTED_MODEL_TYPES.get(str(model_type))
    if cls is None:
        raise UnsupportedArchitectureError(
            f"attrlab has no adapter for model_type={model_type!r} "
            f"({type(model).__name__}). Supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}. "
            "Adding one is a single small file: see docs/adapters.md."
        )
    return cls(model)


__all__ = ["Adapter", "ModelConfig", "adapter_for", "SUPPORTED_MODEL_TYPES", "ADAPTERS"]
