"""The model zoo: tiny trained models with known answers, bundled for offline use.

Each task is a seeded generator of prompts with known answers, counterfactual
prompts and ground truth (:func:`task`); each has a small Hugging Face model
trained on it by ``python -m attrlab.zoo.train TASK`` and shipped inside the
package (:func:`load`). See ``docs/zoo.md``.

Example:
    >>> import attrlab as al
    >>> "ioi" in al.zoo.tasks()
    True
    >>> lm = al.zoo.load("ioi")
    >>> ex = al.zoo.task("ioi").examples(1, seed=0)[0]
    >>> logits, _ = lm.run(ex.prompt, last_only=True)
    >>> int(logits[0, -1].argmax()) == lm.token_id(ex.answer)
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .task import Example, Task

if TYPE_CHECKING:
    from ..model.wrapper import LM

MODELS_DIR = Path(__file__).parent / "models"
DATA_DIR = Path(__file__).parent / "data"


_TASKS: dict[str, str] = {
    "ioi": "ioi:IOI",
    "induction": "induction:Induction",
    "facts": "facts:Facts",
    "context_qa": "context_qa:ContextQA",
    "reasoning": "reasoning:Reasoning",
}


def _registry() -> dict[str, str]:
    return _TASKS


def _task_class(name: str) -> type[Task]:
    import importlib

    module, cls = _TASKS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def all_tasks() -> list[str]:
    """Names of every task generator (whether or not its model is bundled).

    Example:
        >>> import attrlab as al
        >>> al.zoo.all_tasks()
        ['ioi', 'induction', 'facts', 'context_qa', 'reasoning']
    """
    return list(_registry())


def tasks() -> list[str]:
    """Names of the tasks whose trained model is bundled (loadable with :func:`load`).

    Example:
        >>> import attrlab as al
        >>> set(al.zoo.tasks()) <= set(al.zoo.all_tasks())
        True
    """
    return [n for n in _registry() if (model_path(n) / "model.safetensors").exists()]


def task(name: str) -> Any:
    """The task generator ``name`` ("ioi", "induction", "facts", "context_qa", "reasoning").

    Raises:
        InputError: unknown task name.

    Example:
        >>> import attrlab as al
        >>> ex = al.zoo.task("context_qa").examples(1, seed=0)[0]
        >>> ex.sources[ex.gold] in ex.prompt
        True
    """
    reg = _registry()
    if name not in reg:
        raise InputError(f"no zoo task {name!r}; choose from {', '.join(reg)}")
    return _task_class(name)()


def model_path(name: str) -> Path:
    """The folder of the bundled Hugging Face model of task ``name``.

    ``transformers.AutoModelForCausalLM.from_pretrained(model_path("ioi"))``
    loads it without attrlab.

    Example:
        >>> import attrlab as al
        >>> (al.zoo.model_path("ioi") / "config.json").exists()
        True
    """
    if name not in _registry():
        raise InputError(f"no zoo task {name!r}; choose from {', '.join(_registry())}")
    return MODELS_DIR / name


def load(name: str, device: Any = None) -> LM:
    """The bundled model of task ``name``, wrapped (eager attention, float32).

    Raises:
        InputError: unknown task, or its model is not bundled (train it with
            ``python -m attrlab.zoo.train NAME``).

    Example:
        >>> import attrlab as al
        >>> al.zoo.load("ioi").cfg.family
        'gpt2'
    """
    from ..model.loading import load as _load

    path = model_path(name)
    if not (path / "model.safetensors").exists():
        raise InputError(
            f"the zoo model {name!r} is not bundled at {path}; "
            f"train it with: python -m attrlab.zoo.train {name}"
        )
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a few KB from disk: no "Loading weights" bar
    try:
        lm = _load(str(path), device=device, attn_implementation="eager")
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    lm.name = f"zoo/{name}"
    return lm


__all__ = [
    "DATA_DIR",
    "Example",
    "MODELS_DIR",
    "Task",
    "all_tasks",
    "load",
    "model_path",
    "task",
    "tasks",
]
