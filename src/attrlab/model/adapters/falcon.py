"""Falcon: three block layouts in one ``model_type``.

- falcon-7b: parallel attention + MLP reading one shared ``input_layernorm``,
  multi-query attention (fused ``query_key_value`` = all query heads, one key
  head, one value head);
- falcon-40b / 180b (``new_decoder_architecture``): parallel, grouped-query
  attention laid out per key/value group as (its query heads, k, v), and two
  norms ``ln_attn`` / ``ln_mlp`` (one shared norm with ``num_ln_in_parallel_attn=1``);
- falcon-rw (``parallel_attn=False``): sequential blocks, per-head (q, k, v)
  layout, ALiBi position biases instead of rotary, biases on every linear map.

Parallel blocks add attention's output into the MLP's output *in place*
(``mlp_output += attention_output``) before the residual add, so the hook on
the MLP hands the block a copy (:class:`~.hookpoints.Chain` with
``copy_out``): ``mlp.out`` stays the MLP's own output and every site is exact.
Rotary scores are ``scaling * rope(q) . rope(k)`` of the sites (``scores_qk``
exact); ALiBi scores are not a function of q and k, and ``scores_qk`` refuses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UnsupportedArchitectureError
from .base import OLD_ALIBI_RELEVANCE, TRANSFORMERS_MAJOR, Adapter, ModelConfig, get_path
from .hookpoints import Chain, real_roles

ALIBI_REFUSAL = (
    "this Falcon checkpoint uses ALiBi (alibi=True): the attention scores add a "
    "per-head slope times the key position, so they are not a function of the "
    "attn.q / attn.k sites"
)


class FalconAdapter(Adapter):
    family = "falcon"
    model_types = ("falcon",)

    embed_path = "transformer.word_embeddings"
    blocks_path = "transformer.h"
    final_norm_path = "transformer.ln_f"
    attn_name = "self_attention"
    o_proj_name = "self_attention.dense"
    q_name = k_name = v_name = None
    qkv_name = "self_attention.query_key_value"
    down_proj_name = "mlp.dense_4h_to_h"
    attn_in_norm_name = "input_layernorm"
    mlp_in_norm_name = "post_attention_layernorm"
    norm_kind = "layernorm"
    rotary_path = "transformer.rotary_emb"

    def _make_config(self) -> ModelConfig:
        c = self.hf_config
        if c.new_decoder_architecture:
            n_kv = c.num_kv_heads
        else:
            n_kv = 1 if c.multi_query else c.num_attention_heads
        return dataclasses.replace(super()._make_config(), n_kv_heads=n_kv)

    def _d_mlp(self) -> int:
        return int(self.hf_config.ffn_hidden_size)

    def parallel_residual(self) -> bool:
        c = self.hf_config
        return bool(c.new_decoder_architecture or c.parallel_attn)

    # ----------------------------------------------------------------- norms
    def attn_in_norm(self, layer: int) -> nn.Module:
        block: Any = self.block(layer)
        return block.ln_attn if hasattr(block, "ln_attn") else block.input_layernorm

    def mlp_in_norm(self, layer: int) -> nn.Module:
        block: Any = self.block(layer)
        if hasattr(block, "ln_mlp"):  # new_decoder_architecture with two norms
            return block.ln_mlp
        if self.parallel_residual():  # one norm read by attention and the MLP
            return block.input_layernorm
        return block.post_attention_layernorm

    # ------------------------------------------------------------------- MLP
    def mlp(self, layer: int) -> nn.Module:
        mod = get_path(self.block(layer), self.mlp_name)
        # parallel blocks add attention's output into the MLP's output in place
        return Chain(mod, copy_out=True) if self.parallel_residual() else mod

    def mlp_passthrough(self, layer: int) -> Any:
        if self.parallel_residual():
            return None  # the block adds into the MLP's output in place: it has to run
        return super().mlp_passthrough(layer)

    # ------------------------------------------------------------- q, k, v
    def split_qkv(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c, hc = self.cfg, self.hf_config
        heads = out.unflatten(-1, (-1, c.d_head))
        if hc.new_decoder_architecture:  # per kv group: (its query heads, k, v)
            grouped = heads.unflatten(-2, (c.n_kv_heads, -1))
            return grouped[..., :-2, :].flatten(-3, -2), grouped[..., -2, :], grouped[..., -1, :]
        if hc.multi_query:  # all query heads, one k head, one v head
            q, k, v = heads.split([c.n_heads, 1, 1], dim=-2)
            return q, k, v
        q, k, v = heads.unflatten(-2, (c.n_heads, 3)).unbind(-2)  # per head (q, k, v)
        return q, k, v

    def merge_qkv(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c, hc = self.cfg, self.hf_config
        if hc.new_decoder_architecture:
            qg = q.unflatten(-2, (c.n_kv_heads, -1))
            return torch.cat([qg, k[..., None, :], v[..., None, :]], dim=-2).flatten(-3)
        if hc.multi_query:
            return torch.cat([q, k, v], dim=-2).flatten(-2)
        return torch.stack([q, k, v], dim=-2).flatten(-3)

    # ------------------------------------------------------ attention scores
    def qk_scores_exact(self, n_pos: int) -> bool:
        return not self.hf_config.alibi and super().qk_scores_exact(n_pos)

    def scores_qk(self, q: Tensor, k: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        if self.hf_config.alibi:
            raise UnsupportedArchitectureError(
                f"scores_qk is not available for family {self.family!r}: {ALIBI_REFUSAL}"
            )
        return super().scores_qk(q, k, position_ids)

    def relevance_roles(self) -> dict[str, list[nn.Module]]:
        if self.hf_config.alibi and TRANSFORMERS_MAJOR < 5:
            raise UnsupportedArchitectureError(f"family 'falcon': {OLD_ALIBI_RELEVANCE}")
        roles = real_roles(super().relevance_roles())
        # FalconLinear subclasses nn.Linear (same formula): rules act on it too
        seen = {id(m) for m in roles["linear"]}
        roles["linear"] += [
            m for m in self.model.modules() if isinstance(m, nn.Linear) and id(m) not in seen
        ]
        return roles
