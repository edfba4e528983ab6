"""OLMoE: Llama layout with RMS norms over all query heads and all key heads
(``q_norm`` / ``k_norm`` on the full projections, as in OLMo 2), optional
``clip_qkv``, and a routed mixture of experts (top-k weights not renormalised
unless ``norm_topk_prob``)."""

from __future__ import annotations

from .moe import MoeAdapter


class OlmoeAdapter(MoeAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
    n_experts_field = "num_experts"
    qk_scores_refusal = (
        "OLMoE applies RMS norms over all query heads (q_norm) and all key heads "
        "(k_norm) to the attn.q / attn.k sites, so the scores are not a bilinear form of them"
    )
