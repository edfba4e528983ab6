"""GPT-2 (and its ``Conv1D`` layers, fused ``c_attn``, learned positions)."""

from __future__ import annotations

from .base import Adapter


class GPT2Adapter(Adapter):
    family = "gpt2"
    model_types = ("gpt2",)

    embed_path = "transformer.wte"
    pos_embed_path = "transformer.wpe"
    blocks_path = "transformer.h"
    final_norm_path = "transformer.ln_f"
    unembed_path = "lm_head"

    attn_name = "attn"
    o_proj_name = "attn.c_proj"
    q_name = k_name = v_name = None
    qkv_name = "attn.c_attn"
    mlp_name = "mlp"
    down_proj_name = "mlp.c_proj"
    attn_in_norm_name = "ln_1"
    mlp_in_norm_name = "ln_2"
    norm_kind = "layernorm"
    plain_qk_scores = True

    def attn_scale(self, layer: int) -> float:
        # older transformers versions keep the two config flags, not ``scaling``
        c = self.hf_config
        s = float(self.cfg.d_head) ** -0.5 if getattr(c, "scale_attn_weights", True) else 1.0
        if getattr(c, "scale_attn_by_inverse_layer_idx", False):
            s /= float(layer + 1)
        return s
