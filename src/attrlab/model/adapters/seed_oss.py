"""Seed-OSS (ByteDance): the Llama layout with q/k/v biases."""

from __future__ import annotations

from .llama import LlamaAdapter


class SeedOssAdapter(LlamaAdapter):
    family = "seed_oss"
    model_types = ("seed_oss",)
