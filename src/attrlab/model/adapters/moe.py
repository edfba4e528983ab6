"""Mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the shared
machinery of the families whose MLP is a top-k routed set of experts.

In transformers 5 these blocks are ``mlp.gate`` (a top-k router returning
``(router_logits, routing_weights, expert_index)``) and ``mlp.experts`` (all
experts' weights fused in 3-D parameters, called as
``experts(x [tokens, d], index [tokens, k], weights [tokens, k])``), optionally a
shared expert. The adapter says where they are and gives two formulas, both
checked against the model in tests:

* :meth:`MoeAdapter.route`: router logits -> (weights, index), what the router
  module does after its linear map (so the ``mlp.router`` site is writable);
* :meth:`MoeAdapter.expert_outputs`: each routed expert's weighted output,
  computed by the experts module's own forward with one (token, expert) pair
  per row (no expert formula re-derived here).

Neurons of an MoE MLP (``mlp.neurons``, ``W_out``) are refused: the experts'
hidden units live inside fused 3-D parameters and are not the input of one
output projection.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("mixtral"))
    >>> lm.cfg.n_experts, lm.adapter.experts(0) is not None
    (4, True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...errors import UnsupportedArchitectureError
from .base import ModelConfig, get_path
from .llama import LlamaAdapter


class MoeAdapter(LlamaAdapter):
    """Llama layout whose MLP (``mlp``) is a routed mixture of experts.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("qwen3_moe"))
        >>> type(lm.adapter).__mro__[1].__name__
        'MoeAdapter'
    """

    router_name: ClassVar[str] = "mlp.gate"
    experts_name: ClassVar[str] = "mlp.experts"
    #: a shared expert every token uses and its gate (Qwen2-MoE), if any
    shared_expert_name: ClassVar[str | None] = None
    shared_gate_name: ClassVar[str | None] = None
    #: config field holding the number of routed experts
    n_experts_field: ClassVar[str] = "num_experts"
    #: the router casts its top-k weights back to the logits' dtype (Qwen, OLMoE);
    #: Mixtral keeps them in float32
    route_in_logit_dtype: ClassVar[bool] = True

    min_transformers_major: ClassVar[int] = 5
    old_transformers_reason: ClassVar[str] = (
        "4.x keeps one module per expert and a router without its top-k; the adapter reads "
        "transformers 5's fused experts"
    )

    def _make_config(self) -> ModelConfig:
        cfg = super()._make_config()
        c = self.hf_config
        return dataclasses.replace(
            cfg,
            n_experts=int(getattr(c, self.n_experts_field)),
            n_shared_experts=1 if self.shared_expert_name is not None else 0,
        )

    def _dense(self, what: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(
            f"{what} is not defined for family {self.family!r}: its MLPs are mixtures of "
            "experts whose weights are fused 3-D parameters (one output projection per expert, "
            "scaled by a per-token routing weight), so there is no single MLP neuron layer. "
            "Use the blocks.{l}.mlp.experts site or units='experts'."
        )

    def down_proj(self, layer: int) -> nn.Module:
        if self.experts(layer) is None:  # a dense layer of a partly sparse model
            return super().down_proj(layer)
        raise self._dense("mlp.neurons / W_out (an MoE layer's neurons)")

    def relevance_roles(self) -> dict[str, list[nn.Module]]:
        """The base roles plus ``router``: each MoE layer's router and shared-expert
        gate, whose weights relevance rules hold constant (:mod:`attrlab.lrp`)."""
        roles = super().relevance_roles()
        gates: list[nn.Module] = []
        for layer in range(self.cfg.n_layers):
            router, shared = self.router(layer), self.shared_expert(layer)
            gates += [router] if router is not None else []
            gates += [shared[1]] if shared is not None and shared[1] is not None else []
        roles["router"] = gates
        return roles

    # ------------------------------------------------------ mixture of experts
    def _moe_layer(self, layer: int) -> bool:
        return type(self.mlp(layer)).__name__.endswith("SparseMoeBlock")

    def experts(self, layer: int) -> nn.Module | None:
        return get_path(self.block(layer), self.experts_name) if self._moe_layer(layer) else None

    def router(self, layer: int) -> nn.Module | None:
        return get_path(self.block(layer), self.router_name) if self._moe_layer(layer) else None

    def route(self, layer: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights [tokens, k], index [tokens, k])`` of router logits
        ``[tokens, n_experts]``: softmax in float32, top-k, renormalised when the
        router does (``norm_topk_prob``; Mixtral always).

        Example:
            >>> import torch, attrlab as al
            >>> a = al.wrap(*al.testing.tiny_model("mixtral")).adapter
            >>> w, i = a.route(0, torch.tensor([[0.0, 3.0, 1.0, 2.0]]))
            >>> i.tolist(), round(float(w.sum()), 6)
            ([[1, 3]], 1.0)
        """
        router: Any = self.router(layer)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top, index = torch.topk(probs, router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            top = top / top.sum(dim=-1, keepdim=True)
        if self.route_in_logit_dtype:
            top = top.to(logits.dtype)
        return top, index

    def expert_outputs(self, layer: int, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """Each routed expert's weighted output ``[tokens, n_experts, d_model]``
        (zero where a token does not use the expert), from the experts module's
        own forward run on one (token, expert) pair per row; the sum over
        experts is the module's output.

        Example:
            >>> import torch, attrlab as al
            >>> a = al.wrap(*al.testing.tiny_model("mixtral")).adapter
            >>> x = torch.randn(3, 32)
            >>> w, i = a.route(0, a.router(0)(x)[0])
            >>> per = a.expert_outputs(0, x, i, w)
            >>> bool(torch.allclose(per.sum(1), a.experts(0)(x, i, w), atol=1e-6))
            True
        """
        experts: Any = self.experts(layer)
        n, k = index.shape
        d = x.shape[-1]
        pairs = experts.forward(  # .forward: the module's own code, none of attrlab's hooks
            x.repeat_interleave(k, 0), index.reshape(-1, 1), weights.reshape(-1, 1)
        )
        out = torch.zeros(n, self.cfg.n_experts, d, dtype=pairs.dtype, device=pairs.device)
        return out.scatter(1, index[..., None].expand(n, k, d), pairs.reshape(n, k, d))
