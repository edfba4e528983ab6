"""Qwen3-MoE: Qwen 3 attention (per-head q/k RMS norms) and a routed mixture of
experts in every sparse layer (``mlp_only_layers`` / ``decoder_sparse_step``
may leave some layers dense: those have no ``mlp.router`` / ``mlp.experts``
sites, and keep their neurons)."""

from __future__ import annotations

from .moe import MoeAdapter
from .qwen3 import Qwen3Adapter


class Qwen3MoeAdapter(MoeAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    qk_scores_refusal = Qwen3Adapter.qk_scores_refusal
