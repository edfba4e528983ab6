"""GPT-Neo: the GPT-2 layout with ``nn.Linear`` layers, separate bias-free
q/k/v projections (inside ``attn.attention``), learned positions, no scaling
of ``q . k`` (``attn_scale`` is 1), and layers alternating global and local
attention (a causal window of ``window_size`` keys): ``scores_qk`` reproduces
the scores of runs no longer than the window."""

from __future__ import annotations

from .base import Adapter


class GPTNeoAdapter(Adapter):
    family = "gpt_neo"
    model_types = ("gpt_neo",)

    embed_path = "transformer.wte"
    pos_embed_path = "transformer.wpe"
    blocks_path = "transformer.h"
    final_norm_path = "transformer.ln_f"
    attn_name = "attn.attention"
    o_proj_name = "attn.attention.out_proj"
    q_name = "attn.attention.q_proj"
    k_name = "attn.attention.k_proj"
    v_name = "attn.attention.v_proj"
    down_proj_name = "mlp.c_proj"
    attn_in_norm_name = "ln_1"
    mlp_in_norm_name = "ln_2"
    norm_kind = "layernorm"
    plain_qk_scores = True

    def attn_scale(self, layer: int) -> float:
        return 1.0  # GPT-Neo does not scale q . k

    def qk_scores_exact(self, n_pos: int) -> bool:
        # local layers see only the last window_size keys
        local = "local" in self.hf_config.attention_layers
        return super().qk_scores_exact(n_pos) and (not local or n_pos <= self.hf_config.window_size)
