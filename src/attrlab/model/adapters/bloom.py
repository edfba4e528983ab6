"""BLOOM: ALiBi position biases (no position embeddings), a LayerNorm on the
token embeddings (``word_embeddings_layernorm``: ``blocks.0.resid_pre`` is the
normed ``embed``), a fused ``query_key_value`` laid out per head as
(q_h, k_h, v_h), and attention and MLP modules that add the residual
themselves: ``attn.out`` is the output projection's (``dense``) output and the
MLP is hooked from ``dense_h_to_4h``'s input to ``dense_4h_to_h``'s output
(:class:`~.hookpoints.Chain`), so every site is exact.

Refused: ``scores_qk`` (ALiBi, :attr:`qk_scores_refusal`), and at wrap time the
two settings no released checkpoint uses that break the sites —
``apply_residual_connection_post_layernorm`` (the residual is the normed
stream) and ``slow_but_exact`` tensor-parallel projections (no ``dense`` call).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UnsupportedArchitectureError
from .base import Adapter
from .hookpoints import Chain, real_roles


class BloomAdapter(Adapter):
    family = "bloom"
    model_types = ("bloom",)

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
    qk_scores_refusal = (
        "BLOOM adds an ALiBi bias (a per-head slope times the key position) to the "
        "attention scores, so they are not a function of the attn.q / attn.k sites"
    )

    def __init__(self, model: nn.Module):
        c: Any = model.config
        if c.apply_residual_connection_post_layernorm:
            raise UnsupportedArchitectureError(
                "family 'bloom': apply_residual_connection_post_layernorm=True makes each "
                "block's residual the layer-normed stream, so resid_post is not "
                "resid_pre + attn.out + mlp.out and no decomposition holds"
            )
        if c.pretraining_tp > 1 and c.slow_but_exact:
            raise UnsupportedArchitectureError(
                "family 'bloom': slow_but_exact=True with pretraining_tp > 1 computes the "
                "output projections slice by slice without calling the dense modules, which "
                "the attn.out / mlp.out sites hook; load with slow_but_exact=False (same weights)"
            )
        super().__init__(model)

    def attn_out_module(self, layer: int) -> nn.Module:
        # the attention module returns resid_pre + its output: hook the projection
        return self.o_proj(layer)

    def mlp(self, layer: int) -> nn.Module:
        m: Any = self.block(layer).mlp  # forward(x, residual) adds the residual itself
        return Chain(m.dense_h_to_4h, m.gelu_impl, m.dense_4h_to_h)

    def mlp_passthrough(self, layer: int) -> Any:
        return None  # the MLP module adds the residual: it has to run

    def split_qkv(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # [b, p, h * 3 * dh] laid out per head as (q_h, k_h, v_h)
        q, k, v = out.unflatten(-1, (self.cfg.n_heads, 3, self.cfg.d_head)).unbind(-2)
        return q, k, v

    def merge_qkv(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.stack([q, k, v], dim=-2).flatten(-3)

    def relevance_roles(self) -> dict[str, list[nn.Module]]:
        roles = real_roles(super().relevance_roles())
        blocks: list[Any] = [self.block(layer) for layer in range(self.cfg.n_layers)]
        roles["mlp"] = [b.mlp for b in blocks]
        roles["activation"] = [b.mlp.gelu_impl for b in blocks]  # a custom autograd GELU
        return roles
