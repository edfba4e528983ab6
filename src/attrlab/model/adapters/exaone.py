"""EXAONE 3 / 3.5 (LG AI Research): transformers loads these checkpoints
(``model_type="exaone"``) as ``LlamaForCausalLM``: the Llama layout."""

from __future__ import annotations

from .llama import LlamaAdapter


class ExaoneAdapter(LlamaAdapter):
    family = "exaone"
    model_types = ("exaone",)
