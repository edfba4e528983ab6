"""Qwen2-MoE: Qwen 2 attention (q/k/v biases) and a routed mixture of experts
plus one *shared expert* that every token uses, scaled by a sigmoid gate
(``sigmoid(shared_expert_gate(x)) * shared_expert(x)``). The ``mlp.experts``
site gives the shared expert its own slot after the routed experts (index
``n_experts``), holding the gated output, so the slots sum to ``mlp.out``.
Layers listed in ``mlp_only_layers`` (or off ``decoder_sparse_step``) are dense."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import get_path
from .moe import MoeAdapter


class Qwen2MoeAdapter(MoeAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    shared_expert_name = "mlp.shared_expert"
    shared_gate_name = "mlp.shared_expert_gate"

    def shared_expert(self, layer: int) -> tuple[nn.Module, nn.Module | None] | None:
        if self.experts(layer) is None:
            return None
        block = self.block(layer)
        return get_path(block, self.shared_expert_name), get_path(block, self.shared_gate_name)

    def shared_output(self, layer: int, out: Tensor, gate: Tensor | None) -> Tensor:
        """``sigmoid(gate) * out``: the shared expert's gated contribution."""
        assert gate is not None
        return torch.sigmoid(gate) * out
