"""Persimmon (Fuyu's language model): LayerNorms with biases, a fused
``query_key_value`` laid out per head as (q_h, k_h, v_h), optional LayerNorms
on each head's query and key (``qk_layernorm``, after the ``attn.q`` /
``attn.k`` sites), rotary embedding on the first ``partial_rotary_factor`` of
each head (``scores_qk`` refuses), and an ungated squared-ReLU MLP
(``dense_h_to_4h`` -> ``dense_4h_to_h``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import OLD_ATTENTION_WEIGHTS, Adapter


class PersimmonAdapter(Adapter):
    family = "persimmon"
    model_types = ("persimmon",)

    final_norm_path = "model.final_layernorm"
    o_proj_name = "self_attn.dense"
    q_name = k_name = v_name = None
    qkv_name = "self_attn.query_key_value"
    down_proj_name = "mlp.dense_4h_to_h"
    norm_kind = "layernorm"
    min_transformers_major = 5
    old_transformers_reason = OLD_ATTENTION_WEIGHTS
    qk_scores_refusal = (
        "Persimmon rotates only the first partial_rotary_factor of each query / key head "
        "(after per-head q / k LayerNorms), which scores_qk does not reproduce"
    )

    def split_qkv(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # [b, p, h * 3 * dh] laid out per head as (q_h, k_h, v_h)
        q, k, v = out.unflatten(-1, (self.cfg.n_heads, 3, self.cfg.d_head)).unbind(-2)
        return q, k, v

    def merge_qkv(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.stack([q, k, v], dim=-2).flatten(-3)
