"""OLMo and OLMo 2.

OLMo (1): Llama layout with non-parametric LayerNorms (no weight, no bias, eps
fixed at 1e-5); optional clamping of q/k/v (``clip_qkv``), applied after the
``attn.q|k|v`` sites.

OLMo 2: no norms before attention or the MLP: RMS norms on their outputs before
the residual add (like Gemma 2's post-norms), and RMS norms over all query heads
(``q_norm``) and all key heads (``k_norm``) after the projections.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Adapter


class OlmoAdapter(Adapter):
    family = "olmo"
    model_types = ("olmo",)
    norm_kind = "layernorm"
    rotary_path = "model.rotary_emb"

    @staticmethod
    def norm_eps(norm: nn.Module) -> float:
        return 1e-5  # OlmoLayerNorm hard-codes it

    def norm_affine(self, norm: nn.Module) -> tuple[Tensor, Tensor | None]:
        # no learnable weight or bias: the identity affine map
        d = int(norm.normalized_shape[0])  # type: ignore[index]
        return torch.ones(d, device=self.input_device()), None

    def qk_scores_exact(self, n_pos: int) -> bool:
        # clamped queries / keys are not the attn.q / attn.k sites
        return self.hf_config.clip_qkv is None and super().qk_scores_exact(n_pos)


class _InputOf(nn.Module):
    """Stands for a norm the block does not have: the identity map, whose
    forward hooks are the hooks of the module that reads its would-be output
    (the attention or the MLP), so sites placed on "the norm's input" see that
    module's input."""

    def __init__(self, reader: nn.Module):
        super().__init__()
        self.__dict__["reader"] = reader  # not a submodule: no second registration

    def forward(self, x: Tensor) -> Tensor:
        return x

    def register_forward_pre_hook(self, hook: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.__dict__["reader"].register_forward_pre_hook(hook, **kwargs)

    def register_forward_hook(self, hook: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise NotImplementedError("a missing norm has no output to hook")


class Olmo2Adapter(Adapter):
    family = "olmo2"
    model_types = ("olmo2",)
    mlp_in_norm_name = "post_attention_layernorm"  # unused: see mlp_in_norm
    attn_out_norm_name = "post_attention_layernorm"
    mlp_out_norm_name = "post_feedforward_layernorm"
    qk_scores_refusal = (
        "OLMo 2 applies RMS norms over all query heads (q_norm) and all key heads "
        "(k_norm) to the attn.q / attn.k sites, so the scores are not a bilinear form of them"
    )

    def attn_in_norm(self, layer: int) -> nn.Module:
        """No pre-attention norm: attention reads ``resid_pre`` itself."""
        return _InputOf(self.attn(layer))

    def mlp_in_norm(self, layer: int) -> nn.Module:
        """No pre-MLP norm: the MLP reads ``resid_mid`` itself (``mlp.in`` equals ``mlp.normed``)."""
        return _InputOf(self.mlp(layer))
