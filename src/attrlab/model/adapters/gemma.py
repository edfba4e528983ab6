"""Gemma 1/2/3: RMSNorm with ``(1 + w)`` weights and embeddings scaled inside the
embedding module; Gemma 2 and 3 add norms on the attention and MLP outputs
before the residual add, and Gemma 2 soft-caps the final logits."""

from __future__ import annotations

from typing import ClassVar

from .base import Adapter


class GemmaAdapter(Adapter):
    family = "gemma"
    model_types: ClassVar[tuple[str, ...]] = ("gemma",)
    norm_kind = "rmsnorm_plus_one"
    rotary_path: ClassVar[str | None] = "model.rotary_emb"


class Gemma2Adapter(GemmaAdapter):
    family = "gemma2"
    model_types = ("gemma2", "gemma3_text")
    mlp_in_norm_name = "pre_feedforward_layernorm"
    attn_out_norm_name = "post_attention_layernorm"
    mlp_out_norm_name = "post_feedforward_layernorm"
    # Gemma 2 soft-caps attention scores; Gemma 3 rotates local and global layers
    # differently: scores_qk does not reproduce them
    rotary_path = None
