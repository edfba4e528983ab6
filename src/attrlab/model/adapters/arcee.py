"""Arcee (AFM): the Llama layout with an ungated MLP ``up_proj`` -> ``down_proj``."""

from __future__ import annotations

from .llama import LlamaAdapter


class ArceeAdapter(LlamaAdapter):
    family = "arcee"
    model_types = ("arcee",)
