"""EXAONE 4.0: the OLMo 2 block (no norms before attention or the MLP; RMS
norms on their outputs before the residual add, so ``attn.q_in`` reads
``resid_pre`` and ``mlp.in`` equals ``mlp.normed``), per-head RMS norms on
queries and keys after the ``attn.q`` / ``attn.k`` sites, and layers mixing
sliding-window attention with rotary and global attention without it:
``scores_qk`` refuses."""

from __future__ import annotations

from .olmo import Olmo2Adapter


class Exaone4Adapter(Olmo2Adapter):
    family = "exaone4"
    model_types = ("exaone4",)
    qk_scores_refusal = (
        "EXAONE 4 applies RMS norms to each query and key head (q_norm, k_norm) after the "
        "attn.q / attn.k sites, and its global layers use no rotary embedding"
    )
