"""Nemotron (Minitron): the Llama layout with LayerNorms whose effective weight
is ``1 + w`` (``NemotronLayerNorm1P``, with biases), an ungated MLP
(``up_proj`` -> squared ReLU -> ``down_proj``) and rotary embedding on the
first ``partial_rotary_factor`` of each head, which ``scores_qk`` does not
reproduce (it refuses)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import OLD_ATTENTION_WEIGHTS, Adapter


class NemotronAdapter(Adapter):
    family = "nemotron"
    model_types = ("nemotron",)
    norm_kind = "layernorm"
    min_transformers_major = 5
    old_transformers_reason = OLD_ATTENTION_WEIGHTS
    qk_scores_refusal = (
        "Nemotron rotates only the first partial_rotary_factor of each query / key "
        "head, which scores_qk does not reproduce"
    )

    def norm_affine(self, norm: nn.Module) -> tuple[Tensor, Tensor | None]:
        w, b = super().norm_affine(norm)
        return 1.0 + w, b  # LayerNorm1P: the stored weight is offset by one
