"""InternLM 3: transformers loads these checkpoints (``model_type="internlm3"``)
as ``LlamaForCausalLM``: the Llama layout."""

from __future__ import annotations

from .llama import LlamaAdapter


class InternLM3Adapter(LlamaAdapter):
    family = "internlm3"
    model_types = ("internlm3",)
