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
from .arcee import ArceeAdapter
from .base import Adapter, ModelConfig
from .bloom import BloomAdapter
from .codegen import CodeGenAdapter
from .cohere import CohereAdapter
from .cwm import CwmAdapter
from .ernie4_5 import Ernie4_5Adapter
from .exaone import ExaoneAdapter
from .exaone4 import Exaone4Adapter
from .falcon import FalconAdapter
from .gemma import Gemma2Adapter, GemmaAdapter
from .gemma3 import Gemma3ConditionalAdapter
from .glm import GlmAdapter
from .gpt2 import GPT2Adapter
from .gpt_bigcode import GPTBigCodeAdapter
from .gpt_neo import GPTNeoAdapter
from .gpt_neox import GPTNeoXAdapter
from .gptj import GPTJAdapter
from .granite import GraniteAdapter
from .helium import HeliumAdapter
from .internlm3 import InternLM3Adapter
from .jais2 import Jais2Adapter
from .llama import LlamaAdapter
from .ministral3 import Ministral3Adapter
from .mistral import MistralAdapter
from .mixtral import MixtralAdapter
from .mpt import MptAdapter
from .nemotron import NemotronAdapter
from .olmo import Olmo2Adapter, OlmoAdapter
from .olmoe import OlmoeAdapter
from .opt import OPTAdapter
from .persimmon import PersimmonAdapter
from .phi import PhiAdapter
from .phi3 import Phi3Adapter
from .qwen2 import Qwen2Adapter
from .qwen2_moe import Qwen2MoeAdapter
from .qwen3 import Qwen3Adapter
from .qwen3_moe import Qwen3MoeAdapter
from .seed_oss import SeedOssAdapter
from .smollm3 import SmolLM3Adapter
from .stablelm import StableLmAdapter
from .starcoder2 import Starcoder2Adapter

ADAPTERS: tuple[type[Adapter], ...] = (
    GPT2Adapter,
    StableLmAdapter,
    GraniteAdapter,
    CohereAdapter,
    Starcoder2Adapter,
    GPTBigCodeAdapter,
    HeliumAdapter,
    SeedOssAdapter,
    ArceeAdapter,
    Ernie4_5Adapter,
    SmolLM3Adapter,
    GlmAdapter,
    Jais2Adapter,
    Ministral3Adapter,
    CwmAdapter,
    GPTNeoXAdapter,
    LlamaAdapter,
    MistralAdapter,
    Qwen2Adapter,
    GemmaAdapter,
    Gemma2Adapter,
    Phi3Adapter,
    Qwen3Adapter,
    OlmoAdapter,
    Olmo2Adapter,
    PhiAdapter,
    GPTJAdapter,
    FalconAdapter,
    OPTAdapter,
    BloomAdapter,
    Gemma3ConditionalAdapter,
    MptAdapter,
    GPTNeoAdapter,
    NemotronAdapter,
    PersimmonAdapter,
    Exaone4Adapter,
    CodeGenAdapter,
    ExaoneAdapter,
    InternLM3Adapter,
    MixtralAdapter,
    Qwen2MoeAdapter,
    Qwen3MoeAdapter,
    OlmoeAdapter,
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
