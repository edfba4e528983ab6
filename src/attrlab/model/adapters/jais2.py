"""Jais 2: the Llama layout with LayerNorms (with biases), biases on every
projection and an ungated MLP ``up_proj`` -> ``down_proj``."""

from __future__ import annotations

from .llama import LlamaAdapter


class Jais2Adapter(LlamaAdapter):
    family = "jais2"
    model_types = ("jais2",)
    norm_kind = "layernorm"
