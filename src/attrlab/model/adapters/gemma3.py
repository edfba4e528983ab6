"""Gemma 3 multimodal checkpoints (``model_type="gemma3"``,
``Gemma3ForConditionalGeneration``): the Gemma 3 text stack under
``model.language_model`` plus a vision tower and projector that text-only
prompts never reach.

The wrapper keeps the whole model and calls its own forward with token ids
only (so logits are the full model's text-only logits); the sites are the
language model's, laid out as Gemma 3 text (:class:`~.gemma.Gemma2Adapter`),
and the shapes come from ``config.text_config``. This model's forward does not
soft-cap the logits (``Gemma3ForCausalLM`` does, when the text config asks), so
``final_logit_softcap`` is None here whatever the text config says.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .base import ModelConfig
from .gemma import Gemma2Adapter


class Gemma3ConditionalAdapter(Gemma2Adapter):
    family = "gemma3"
    model_types = ("gemma3",)  # type: ignore[assignment]

    embed_path = "model.language_model.embed_tokens"
    blocks_path = "model.language_model.layers"
    final_norm_path = "model.language_model.norm"
    unembed_path = "lm_head"

    def __init__(self, model: nn.Module):
        # the shapes live in the text config, not in the multimodal one
        self.model = model
        config: Any = model.config
        self.hf_config = config.get_text_config()
        self.cfg = self._make_config()

    def _make_config(self) -> ModelConfig:
        return dataclasses.replace(super()._make_config(), final_logit_softcap=None)
