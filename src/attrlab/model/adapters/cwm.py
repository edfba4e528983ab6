"""CWM (Code World Model): the Llama layout with sliding-window layers."""

from __future__ import annotations

from .llama import LlamaAdapter


class CwmAdapter(LlamaAdapter):
    family = "cwm"
    model_types = ("cwm",)
