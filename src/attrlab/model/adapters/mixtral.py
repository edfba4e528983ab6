"""Mixtral: Llama layout whose MLP is a top-2 mixture of experts (``mlp.gate``
router, ``mlp.experts`` fused 3-D expert weights); routing weights stay in
float32 and are always renormalised over the top k."""

from __future__ import annotations

from .moe import MoeAdapter


class MixtralAdapter(MoeAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    n_experts_field = "num_local_experts"
    route_in_logit_dtype = False
