"""Mistral: Llama layout (sliding-window attention is handled by the model's mask)."""

from __future__ import annotations

from .llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    family = "mistral"
    model_types = ("mistral",)
