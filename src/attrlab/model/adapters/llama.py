"""Llama: separate q/k/v projections, RMSNorm, gated MLP, no biases."""

from __future__ import annotations

from .base import Adapter


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama",)
    rotary_path = "model.rotary_emb"
