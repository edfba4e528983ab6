"""SmolLM3: the Llama layout; some layers skip the rotary embedding (NoPE,
``config.no_rope_layers``), so scores_qk does not reproduce every layer."""

from __future__ import annotations

from .base import Adapter


class SmolLM3Adapter(Adapter):
    family = "smollm3"
    model_types = ("smollm3",)
    rotary_path = None
