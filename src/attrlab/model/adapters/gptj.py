"""GPT-J: parallel attention and MLP reading one shared LayerNorm (``ln_1``),
rotary embedding on the first ``rotary_dim`` dimensions of each head, rotated in
interleaved pairs (GPT-NeoX rotates halves); no q/k/v biases, biased ``lm_head``."""

from __future__ import annotations

from .base import Adapter


class GPTJAdapter(Adapter):
    family = "gptj"
    model_types = ("gptj",)

    embed_path = "transformer.wte"
    blocks_path = "transformer.h"
    final_norm_path = "transformer.ln_f"
    attn_name = "attn"
    o_proj_name = "attn.out_proj"
    q_name = "attn.q_proj"
    k_name = "attn.k_proj"
    v_name = "attn.v_proj"
    down_proj_name = "mlp.fc_out"
    attn_in_norm_name = "ln_1"
    mlp_in_norm_name = "ln_1"  # the MLP reads the attention's norm output
    norm_kind = "layernorm"
    qk_scores_refusal = (
        "GPT-J rotates only the first rotary_dim dimensions of each query / key head, "
        "in interleaved pairs, which scores_qk does not reproduce"
    )

    def parallel_residual(self) -> bool:
        return True
