"""Granite: the Llama layout with four constants outside the modules — the
embedding multiplier (on the token embeddings), the residual multiplier (on
attention's and the MLP's outputs before each residual add), the attention
multiplier (the q.k scale, the attention module's own ``scaling``) and the
logit scaling (logits are divided by it). The sites and weights include them
(see ``Adapter.residual_multiplier``), so decompositions stay exact."""

from __future__ import annotations

from torch import nn

from .llama import LlamaAdapter


class GraniteAdapter(LlamaAdapter):
    family = "granite"
    model_types = ("granite",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        c = self.hf_config
        self.embedding_multiplier = float(c.embedding_multiplier)
        self.residual_multiplier = float(c.residual_multiplier)
        self.logit_multiplier = 1.0 / float(c.logits_scaling)
