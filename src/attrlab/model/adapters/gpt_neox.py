"""GPT-NeoX / Pythia: fused per-head-interleaved ``query_key_value``, optional
parallel residual (attention and MLP both read ``resid_pre``)."""

from __future__ import annotations

from torch import Tensor

from .base import Adapter


class GPTNeoXAdapter(Adapter):
    family = "gpt_neox"
    model_types = ("gpt_neox",)

    embed_path = "gpt_neox.embed_in"
    blocks_path = "gpt_neox.layers"
    final_norm_path = "gpt_neox.final_layer_norm"
    unembed_path = "lm_head"  # "embed_out" before transformers 5

    attn_name = "attention"
    o_proj_name = "attention.dense"
    q_name = k_name = v_name = None
    qkv_name = "attention.query_key_value"
    down_proj_name = "mlp.dense_4h_to_h"
    norm_kind = "layernorm"

    def unembed(self):  # type: ignore[override]
        return getattr(self.model, "lm_head", None) or self.model.embed_out

    def parallel_residual(self) -> bool:
        return bool(self.hf_config.use_parallel_residual)

    def split_qkv(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # [b, p, h * 3 * dh] laid out per head as (q_h, k_h, v_h)
        per_head = out.unflatten(-1, (self.cfg.n_heads, 3 * self.cfg.d_head))
        q, k, v = per_head.chunk(3, dim=-1)
        return q, k, v

    def merge_qkv(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        import torch

        return torch.cat([q, k, v], dim=-1).flatten(-2)
