"""GLM-4 (``glm``): the Llama layout with fused ``gate_up_proj`` and q/k/v biases;
partial, interleaved rotary, which scores_qk does not reproduce."""

from __future__ import annotations

from .base import Adapter


class GlmAdapter(Adapter):
    family = "glm"
    model_types = ("glm",)
    rotary_path = None
