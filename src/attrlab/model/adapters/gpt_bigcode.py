"""GPT-BigCode (SantaCoder, StarCoder 1): the GPT-2 layout with ``nn.Linear``
layers and multi-query attention — the fused ``c_attn`` holds all query heads,
then one shared key head and one shared value head (``n_kv_heads == 1``);
without ``multi_query`` it is laid out per head as (q_h, k_h, v_h)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import Adapter, ModelConfig
from .gpt2 import GPT2Adapter


class GPTBigCodeAdapter(GPT2Adapter):
    family = "gpt_bigcode"
    model_types = ("gpt_bigcode",)

    # the attention module's own ``scaling`` (no per-layer inverse scaling here)
    attn_scale = Adapter.attn_scale

    def _make_config(self) -> ModelConfig:
        n_kv = 1 if self.hf_config.multi_query else self.hf_config.n_head
        return dataclasses.replace(super()._make_config(), family=self.family, n_kv_heads=n_kv)

    def split_qkv(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.hf_config.multi_query:
            return super().split_qkv(out)
        per_head = out.unflatten(-1, (self.cfg.n_heads, 3 * self.cfg.d_head))
        q, k, v = per_head.chunk(3, dim=-1)
        return q, k, v

    def merge_qkv(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.hf_config.multi_query:
            return super().merge_qkv(q, k, v)
        return torch.cat([q, k, v], dim=-1).flatten(-2)
