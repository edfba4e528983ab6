"""StableLM: LayerNorm with biases, partial rotary, optional q/k biases and
per-head q/k LayerNorms, optional parallel residual in which the MLP reads the
pre-attention norm's output (there is no second norm)."""

from __future__ import annotations

from torch import nn

from .base import Adapter


class StableLmAdapter(Adapter):
    family = "stablelm"
    model_types = ("stablelm",)
    norm_kind = "layernorm"
    # partial rotary and optional q/k norms: scores_qk does not reproduce the scores
    rotary_path = None

    def parallel_residual(self) -> bool:
        return bool(self.hf_config.use_parallel_residual)

    def mlp_in_norm(self, layer: int) -> nn.Module:
        if self.parallel_residual():  # no post_attention_layernorm: the shared input norm
            return self.attn_in_norm(layer)
        return super().mlp_in_norm(layer)
