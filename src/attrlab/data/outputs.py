"""Model output functions: the scalar per example whose gradient is the feature.

An output function is called on ONE example (``torch.func.vmap`` batches it)
as ``fn(model, params, *example) -> (value, out_to_loss)``: ``params`` is the
dict of parameters and buffers for :func:`torch.func.functional_call`,
``value`` a 0-d tensor (differentiated), ``out_to_loss`` a 0-d tensor that
relates the loss gradient to the value gradient (TRAK's ``Q``):
``grad(loss) = -out_to_loss * grad(value)``.

- :class:`ClassificationMargin` — ``log(p_y / (1 - p_y))`` of the true class
  (TRAK's choice for classifiers); ``out_to_loss = 1 - p_y`` (exactly: the
  cross-entropy gradient is ``-(1 - p_y)`` times the margin gradient).
- :class:`ClassLogProb` — ``log p_y`` of a classifier (minus its loss); ``out_to_loss = 1``.
- :class:`AnswerLogProb` — for causal LMs: the log-probability of the answer
  tokens (minus the loss on them); ``out_to_loss = 1``.

Example:
    >>> import torch
    >>> from attrlab.data.outputs import ClassificationMargin
    >>> net = torch.nn.Linear(3, 4)
    >>> params = dict(net.named_parameters())
    >>> v, q = ClassificationMargin()(net, params, torch.ones(3), torch.tensor(2))
    >>> v.shape, bool(0 < q < 1)
    (torch.Size([]), True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call


def _at_least_f32(t: Tensor) -> Tensor:
    """Half-precision logits upcast to float32; float64 ones stay float64."""
    return t if t.dtype == torch.float64 else t.float()


class ModelOutput:
    """Base class: ``__call__(model, params, *example) -> (value, out_to_loss)`` for one example."""

    name: str = ""

    def spec(self) -> dict[str, Any]:
        """Identifies the function in store manifests."""
        return {"name": self.name}

    def __call__(
        self, model: nn.Module, params: dict[str, Tensor], *example: Tensor
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class ClassificationMargin(ModelOutput):
    """Margin ``logit_y - logsumexp(other logits) = log(p_y/(1-p_y))`` of a classifier on ``(x, y)``.

    Example:
        >>> ClassificationMargin().spec()
        {'name': 'classification_margin'}
    """

    name = "classification_margin"

    def __call__(  # type: ignore[override]
        self, model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        logits = functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)  # [classes]
        is_y = torch.arange(logits.shape[-1], device=logits.device) == y
        correct = (logits * is_y).sum()
        others = torch.logsumexp(logits.masked_fill(is_y, float("-inf")), dim=-1)
        margin = correct - others
        return margin, torch.sigmoid(-margin).detach()


class ClassLogProb(ModelOutput):
    """Log-probability ``log p_y`` of the true class of a classifier on ``(x, y)`` (minus its
    cross-entropy loss); ``out_to_loss = 1``. The training-side output of influence functions
    (:mod:`attrlab.data.influence`): its gradient is exactly minus the loss gradient.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 4)
        >>> v, q = ClassLogProb()(net, dict(net.named_parameters()), torch.ones(3), torch.tensor(1))
        >>> bool(v < 0), float(q)
        (True, 1.0)
    """

    name = "class_logprob"

    def __call__(  # type: ignore[override]
        self, model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        logits = functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)  # [classes]
        is_y = torch.arange(logits.shape[-1], device=logits.device) == y
        value = (torch.log_softmax(logits, dim=-1) * is_y).sum()
        return value, torch.ones((), dtype=value.dtype)


class AnswerLogProb(ModelOutput):
    """Sum of log-probabilities of the answer tokens of a causal LM example.

    The example is ``(input_ids [T], attention_mask [T], answer_mask [T])``
    (right-padded); ``answer_mask[t] = 1`` where token ``t`` is part of the
    answer (scored from the prediction at ``t - 1``).

    Example:
        >>> AnswerLogProb().spec()
        {'name': 'answer_logprob'}
    """

    name = "answer_logprob"

    def __call__(  # type: ignore[override]
        self, model: nn.Module, params: dict[str, Tensor], ids: Tensor, mask: Tensor, answer: Tensor
    ) -> tuple[Tensor, Tensor]:
        out = functional_call(
            model, params, (), {"input_ids": ids.unsqueeze(0), "attention_mask": mask.unsqueeze(0)}
        )
        logits = out.logits if hasattr(out, "logits") else out[0]
        logp = torch.log_softmax(_at_least_f32(logits[0, :-1]), dim=-1)  # [T-1, vocab]
        tok_lp = logp.gather(-1, ids[1:, None])[:, 0]  # [T-1]
        value = (tok_lp * answer[1:].to(tok_lp.dtype)).sum()
        return value, torch.ones((), dtype=value.dtype)


class AnswerMargin(ModelOutput):
    """Sum over answer tokens of the margin ``log(p_t / (1 - p_t))`` of a causal LM example.

    TRAK's output function carried to language models: unlike the
    log-probability, its gradient does not vanish on tokens the model has
    memorized (``p_t -> 1``). ``out_to_loss`` is the mean of ``1 - p_t`` over
    the answer tokens. Same example layout as :class:`AnswerLogProb`.

    Example:
        >>> AnswerMargin().spec()
        {'name': 'answer_margin'}
    """

    name = "answer_margin"

    def __call__(  # type: ignore[override]
        self, model: nn.Module, params: dict[str, Tensor], ids: Tensor, mask: Tensor, answer: Tensor
    ) -> tuple[Tensor, Tensor]:
        out = functional_call(
            model, params, (), {"input_ids": ids.unsqueeze(0), "attention_mask": mask.unsqueeze(0)}
        )
        logits = _at_least_f32((out.logits if hasattr(out, "logits") else out[0])[0, :-1])
        is_y = torch.arange(logits.shape[-1], device=logits.device)[None, :] == ids[1:, None]
        correct = (logits * is_y).sum(-1)  # [T-1]
        others = torch.logsumexp(logits.masked_fill(is_y, float("-inf")), dim=-1)
        margin = correct - others
        w = answer[1:].to(margin.dtype)
        q = (torch.sigmoid(-margin) * w).sum() / w.sum().clamp_min(1.0)
        return (margin * w).sum(), q.detach()
