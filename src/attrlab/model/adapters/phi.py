"""Phi (phi-1, phi-1.5, phi-2): parallel attention and MLP reading one shared
LayerNorm (``input_layernorm``), partial rotary embedding, biases everywhere
(also the unembedding), a dense final LayerNorm; optional LayerNorms on each
head's query and key (``qk_layernorm``)."""

from __future__ import annotations

from .base import Adapter


class PhiAdapter(Adapter):
    family = "phi"
    model_types = ("phi",)
    o_proj_name = "self_attn.dense"
    down_proj_name = "mlp.fc2"
    mlp_in_norm_name = "input_layernorm"  # the MLP reads the attention's norm output
    final_norm_path = "model.final_layernorm"
    norm_kind = "layernorm"
    qk_scores_refusal = (
        "Phi rotates only the first partial_rotary_factor of each query / key head "
        "(and may layer-normalise q and k first), which scores_qk does not reproduce"
    )

    def parallel_residual(self) -> bool:
        return True
