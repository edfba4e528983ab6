"""OPT: learned positions (looked up at ``position + 2``), separate biased
q/k/v projections, queries scaled inside the attention module (the ``attn.q``
site is the projection before that scale; ``attn_scale`` is the module's
``scaling``, so ``scores_qk`` is exact), and an MLP written out in the block
(``fc1`` -> activation -> ``fc2``) on inputs flattened to ``[batch * pos, d]``:
the MLP sites are hooked through :class:`~.hookpoints.Chain`, which restores
``[batch, pos, ...]``.

When ``word_embed_proj_dim != hidden_size`` the token embeddings are projected
up by ``project_in`` and the final normed residual down by ``project_out``:
the ``embed`` site is ``project_in``'s output (``[batch, pos, d_model]``, what
the residual stream receives) and ``W_U`` is ``project_out`` then ``lm_head``
(``[d_model, d_vocab]``).

Post-LN OPT (``do_layer_norm_before=False``, facebook/opt-350m) is refused:
see :data:`POST_LN_REFUSAL`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UnsupportedArchitectureError
from .base import OLD_ATTENTION_WEIGHTS, Adapter, linear_in_out, param
from .hookpoints import Chain, real_roles

POST_LN_REFUSAL = (
    "this OPT checkpoint is post-LN (do_layer_norm_before=False, like facebook/opt-350m): "
    "each block layer-normalises the residual stream after adding attention's output and "
    "again after adding the MLP's, so resid_post is not resid_pre + attn.out + mlp.out and "
    "the logits are no sum of component contributions; attrlab's sites and decompositions "
    "(DLA, head / MLP units, patching from cached residuals) need a residual stream that "
    "blocks only add to. Pre-LN OPT checkpoints (opt-125m, opt-1.3b and larger) are supported"
)
NO_FINAL_NORM_REFUSAL = (
    "this OPT checkpoint has no final layer norm (_remove_final_layer_norm=True, an old "
    "fine-tuning format), which attrlab's final_norm sites need"
)


class OPTAdapter(Adapter):
    family = "opt"
    model_types = ("opt",)

    embed_path = "model.decoder.embed_tokens"
    pos_embed_path = "model.decoder.embed_positions"
    blocks_path = "model.decoder.layers"
    final_norm_path = "model.decoder.final_layer_norm"
    unembed_path = "lm_head"
    o_proj_name = "self_attn.out_proj"
    down_proj_name = "fc2"
    attn_in_norm_name = "self_attn_layer_norm"
    mlp_in_norm_name = "final_layer_norm"
    norm_kind = "layernorm"
    plain_qk_scores = True
    min_transformers_major = 5
    old_transformers_reason = OLD_ATTENTION_WEIGHTS

    def __init__(self, model: nn.Module):
        c: Any = model.config
        if not c.do_layer_norm_before:
            raise UnsupportedArchitectureError(f"family 'opt': {POST_LN_REFUSAL}")
        if getattr(c, "_remove_final_layer_norm", False):
            raise UnsupportedArchitectureError(f"family 'opt': {NO_FINAL_NORM_REFUSAL}")
        super().__init__(model)

    def _d_mlp(self) -> int:
        return int(self.hf_config.ffn_dim)

    # -------------------------------------------- embedding and unembedding
    def _decoder(self) -> Any:
        return self.model.model.decoder

    def token_embedding(self) -> nn.Module:
        emb = super().token_embedding()
        proj = self._decoder().project_in
        return emb if proj is None else Chain(emb, proj)

    def unembed(self) -> nn.Module:
        head = super().unembed()
        proj = self._decoder().project_out
        return head if proj is None else Chain(proj, head)

    def W_U(self) -> Tensor:
        w, _ = linear_in_out(super().unembed())
        proj = self._decoder().project_out
        if proj is not None:
            w = linear_in_out(proj)[0] @ w  # project_out has no bias
        return w

    def b_U(self) -> Tensor | None:
        return linear_in_out(super().unembed())[1]

    # ------------------------------------------------------------------- MLP
    def mlp(self, layer: int) -> nn.Module:
        b: Any = self.block(layer)
        return Chain(b.fc1, b.activation_fn, b.fc2, block=b)

    def mlp_in_norm(self, layer: int) -> nn.Module:
        b: Any = self.block(layer)
        return Chain(b.final_layer_norm, block=b)

    def down_proj(self, layer: int) -> Chain:
        b: Any = self.block(layer)
        return Chain(b.fc2, block=b)

    def mlp_passthrough(self, layer: int) -> Any:
        return None  # no MLP module to replace: fc1 and fc2 are called by the block

    def W_out(self, layer: int) -> Tensor:
        return linear_in_out(self.down_proj(layer).first)[0]

    def b_out(self, layer: int) -> Tensor | None:
        return linear_in_out(self.down_proj(layer).first)[1]

    # ----------------------------------------------------------------- norms
    def norm_affine(self, norm: nn.Module) -> tuple[Tensor, Tensor | None]:
        if param(norm, "weight") is None:  # layer_norm_elementwise_affine=False
            d = int(norm.normalized_shape[0])  # type: ignore[index]
            return torch.ones(d, device=self.input_device()), None
        return super().norm_affine(norm)

    def relevance_roles(self) -> dict[str, list[nn.Module]]:
        return real_roles(super().relevance_roles())
