"""MPT: ALiBi position biases (no position embeddings), a fused ``Wqkv`` laid
out (all q, all k, all v), LayerNorms without biases, no biases anywhere, and
an MLP module that adds the residual itself (``forward(x, residual)``): the MLP
is hooked from ``up_proj``'s input to ``down_proj``'s output
(:class:`~.hookpoints.Chain`), so ``mlp.out`` is exact.

``scores_qk`` refuses (ALiBi). With ``attn_config.clip_qkv`` the fused
projection is clamped after the ``attn.q|k|v`` sites (as OLMo's ``clip_qkv``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...errors import UnsupportedArchitectureError
from .base import OLD_ALIBI_RELEVANCE, TRANSFORMERS_MAJOR, Adapter
from .hookpoints import Chain, real_roles


class MptAdapter(Adapter):
    family = "mpt"
    model_types = ("mpt",)

    embed_path = "transformer.wte"
    blocks_path = "transformer.blocks"
    final_norm_path = "transformer.norm_f"
    attn_name = "attn"
    o_proj_name = "attn.out_proj"
    q_name = k_name = v_name = None
    qkv_name = "attn.Wqkv"
    down_proj_name = "ffn.down_proj"
    attn_in_norm_name = "norm_1"
    mlp_in_norm_name = "norm_2"
    norm_kind = "layernorm"
    qk_scores_refusal = (
        "MPT adds an ALiBi bias (a per-head slope times the key position) to the "
        "attention scores, so they are not a function of the attn.q / attn.k sites"
    )

    def _d_mlp(self) -> int:
        ffn: Any = self.block(0).ffn
        return int(ffn.up_proj.out_features)

    def _n_ctx(self) -> int | None:
        return int(self.hf_config.max_seq_len)

    def attn_scale(self, layer: int) -> float:
        return float(self.attn(layer).softmax_scale)  # type: ignore[arg-type]

    def mlp(self, layer: int) -> nn.Module:
        ffn: Any = self.block(layer).ffn  # forward(x, residual) adds the residual itself
        return Chain(ffn.up_proj, ffn.act, ffn.down_proj)

    def mlp_passthrough(self, layer: int) -> Any:
        return None  # the MLP module adds the residual: it has to run

    def relevance_roles(self) -> dict[str, list[nn.Module]]:
        if TRANSFORMERS_MAJOR < 5:
            raise UnsupportedArchitectureError(f"family 'mpt': {OLD_ALIBI_RELEVANCE}")
        roles = real_roles(super().relevance_roles())
        blocks: list[Any] = [self.block(layer) for layer in range(self.cfg.n_layers)]
        roles["mlp"] = [b.ffn for b in blocks]
        return roles
