"""Cohere (Command-R): parallel blocks in which attention and the MLP both read
one pre-attention LayerNorm (no bias), interleaved rotary, optional q/k norms,
and logits multiplied by ``logit_scale`` outside the unembedding (the
``unembed`` site, ``W_U`` and ``b_U`` include it)."""

from __future__ import annotations

from torch import nn

from .base import Adapter


class CohereAdapter(Adapter):
    family = "cohere"
    model_types = ("cohere",)
    norm_kind = "layernorm"
    # one norm for both branches: mlp.in is recomputed through it for the MLP alone
    mlp_in_norm_name = "input_layernorm"
    # interleaved rotary (pairs of adjacent dimensions): scores_qk does not reproduce it
    rotary_path = None

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.logit_multiplier = float(self.hf_config.logit_scale)

    def parallel_residual(self) -> bool:
        return True
