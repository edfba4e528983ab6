"""CodeGen: the GPT-J block (parallel attention and MLP reading one shared
``ln_1``; rotary on the first ``rotary_dim`` dimensions of each head in
interleaved pairs, so ``scores_qk`` refuses) with a fused ``qkv_proj`` laid out
for 4-way model parallelism: 4 groups, each holding (its query heads, its value
heads, its key heads) — note the order q, v, k."""

from __future__ import annotations

import torch
from torch import Tensor

from .gptj import GPTJAdapter

MP_NUM = 4  # CodeGenAttention.mp_num, fixed in transformers


class CodeGenAdapter(GPTJAdapter):
    family = "codegen"
    model_types = ("codegen",)

    o_proj_name = "attn.out_proj"
    q_name = k_name = v_name = None  # type: ignore[assignment]
    qkv_name = "attn.qkv_proj"
    down_proj_name = "mlp.fc_out"
    qk_scores_refusal = (
        "CodeGen rotates only the first rotary_dim dimensions of each query / key head, "
        "in interleaved pairs, which scores_qk does not reproduce"
    )

    def split_qkv(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.cfg
        groups = out.unflatten(-1, (MP_NUM, 3, -1))  # [.., mp, (q, v, k), local]
        q, v, k = (
            groups[..., i, :].flatten(-2).unflatten(-1, (c.n_heads, c.d_head)) for i in range(3)
        )
        return q, k, v

    def merge_qkv(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        parts = [t.flatten(-2).unflatten(-1, (MP_NUM, -1)) for t in (q, v, k)]
        return torch.stack(parts, dim=-2).flatten(-3)
