"""Qwen3: Llama layout plus RMS norms on each head's query and key (``q_norm`` /
``k_norm``, applied after the projections and before the rotary embedding)."""

from __future__ import annotations

from .llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    family = "qwen3"
    model_types = ("qwen3",)
    # the attn.q / attn.k sites are the projections' outputs (what the q_in / k_in
    # edges and interventions act on; the model then applies its own q/k norms)
    qk_scores_refusal = (
        "Qwen3 applies per-head RMS norms (q_norm / k_norm) to the attn.q / attn.k "
        "sites before the rotary embedding, so the scores are not a bilinear form of them"
    )
