"""Phi-3: fused ``qkv_proj`` laid out (q, k, v) and fused ``gate_up_proj``."""

from __future__ import annotations

from .base import Adapter


class Phi3Adapter(Adapter):
    family = "phi3"
    model_types = ("phi3",)
    q_name = k_name = v_name = None
    qkv_name = "self_attn.qkv_proj"
    rotary_path = "model.rotary_emb"
