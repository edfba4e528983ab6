"""ERNIE 4.5 (dense): the Llama layout; rotary on interleaved pairs of dimensions,
which scores_qk does not reproduce."""

from __future__ import annotations

from .base import Adapter


class Ernie4_5Adapter(Adapter):
    family = "ernie4_5"
    model_types = ("ernie4_5",)
    rotary_path = None
