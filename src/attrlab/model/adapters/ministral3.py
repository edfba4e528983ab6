"""Ministral 3: the Llama layout; queries are rescaled by position inside
attention (Llama-4 scaling), which scores_qk does not reproduce."""

from __future__ import annotations

from .base import Adapter


class Ministral3Adapter(Adapter):
    family = "ministral3"
    model_types = ("ministral3",)
    rotary_path = None
