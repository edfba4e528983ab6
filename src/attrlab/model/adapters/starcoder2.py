"""StarCoder2: the Llama module layout with LayerNorms (with biases), a plain
(ungated) MLP ``c_fc`` -> ``c_proj`` and biases on every projection."""

from __future__ import annotations

from .llama import LlamaAdapter


class Starcoder2Adapter(LlamaAdapter):
    family = "starcoder2"
    model_types = ("starcoder2",)
    norm_kind = "layernorm"
    down_proj_name = "mlp.c_proj"
