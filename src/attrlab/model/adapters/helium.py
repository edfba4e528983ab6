"""Helium (Kyutai): the Llama layout; rotary on interleaved pairs of dimensions,
which scores_qk does not reproduce."""

from __future__ import annotations

from .base import Adapter


class HeliumAdapter(Adapter):
    family = "helium"
    model_types = ("helium",)
    rotary_path = None
