"""Per-example gradient features: ``torch.func`` (vmap over grad), projected, written to a store.

:func:`featurize` computes, for every training example, the gradient of a
model output function (:mod:`attrlab.data.outputs`) with respect to the
chosen parameters, projects it with a seeded chunked random projection
(:mod:`attrlab.data.project`) and writes it shard by shard to a
:class:`~attrlab.data.store.FeatureStore`. Killed at any moment, it resumes
where it stopped and produces exactly the features of an uninterrupted run:
every batch starts at a fixed offset inside its shard, so the same examples
are always computed together. Under ``torchrun`` each rank featurizes the
shards ``j`` with ``j % world_size == rank`` (see :mod:`attrlab.data.distributed`).

Example:
    >>> import tempfile, torch
    >>> import attrlab.data as ad
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = ad.Examples((torch.randn(10, 4), torch.randint(0, 3, (10,))))
    >>> store = ad.featurize(net, data, tempfile.mkdtemp(), proj_dim=16, shard_size=4)
    >>> store.features().shape, store.gram().shape
    ((10, 16), (16, 16))
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from tqdm.auto import tqdm

from ..errors import InputError
from ..model.budget import example_grad_bytes, grad_batch_size, saved_tensor_bytes
from ..model.offload import has_offload, onloaded, state_items
from .outputs import AnswerLogProb, AnswerMargin, ClassificationMargin, ClassLogProb, ModelOutput
from .project import Projector
from .store import CLAIM_TIMEOUT, FeatureStore

Batch = tuple[Tensor, ...]


class Examples:
    """A training (or query) set: tensors with one row per example, stable ids, optional texts.

    Args:
        tensors: per-example tensors, all ``[n, ...]`` (e.g. ``(x, y)``).
        ids: one unique id per example (default: the row index, which is stable
            for a fixed tensor). Ids identify the dataset in a store's manifest.
        texts: a text per example, shown with top-k retrieval.
        fetch: instead of ``tensors``, ``fetch(start, stop) -> tuple of tensors``
            (lazy: examples are made on demand); needs ``n``.
        n: number of examples when ``fetch`` is given.

    Raises:
        InputError: no stable ids (a one-shot iterable, duplicate ids, wrong count),
            or tensors of different lengths.

    Example:
        >>> import torch
        >>> ex = Examples((torch.zeros(3, 2), torch.tensor([0, 1, 0])), ids=["a", "b", "c"])
        >>> len(ex), ex.batch(1, 3)[1].tolist()
        (3, [1, 0])
    """

    def __init__(
        self,
        tensors: Sequence[Tensor] | None = None,
        ids: Sequence[Any] | None = None,
        texts: Sequence[str] | None = None,
        fetch: Callable[[int, int], Batch] | None = None,
        n: int | None = None,
    ):
        if tensors is not None:
            if isinstance(tensors, Tensor):
                tensors = (tensors,)
            if not isinstance(tensors, (tuple, list)) or not all(
                isinstance(t, Tensor) for t in tensors
            ):
                raise InputError(
                    "Examples needs a tuple of tensors [n, ...] (or fetch=...). A one-shot iterable "
                    "or DataLoader has no stable ids: materialize it and pass ids=..."
                )
            lens = {int(t.shape[0]) for t in tensors}
            if len(lens) != 1:
                raise InputError(f"example tensors have different lengths {sorted(lens)}")
            self._tensors: tuple[Tensor, ...] | None = tuple(tensors)
            self.n = lens.pop()
            self._fetch = None
        elif fetch is not None and n is not None:
            self._tensors, self._fetch, self.n = None, fetch, int(n)
        else:
            raise InputError("give tensors=... or fetch=... with n=...")
        if ids is None:
            ids = range(self.n)
        elif (
            isinstance(ids, (str, bytes))
            or not hasattr(ids, "__len__")
            or not hasattr(ids, "__getitem__")
        ):
            raise InputError(
                "ids must be a sequence with one unique id per example (a generator is not stable)"
            )
        if len(ids) != self.n:
            raise InputError(f"{len(ids)} ids for {self.n} examples")
        if not isinstance(ids, range) and len(set(map(str, ids))) != self.n:
            raise InputError("example ids are not unique: every example needs its own stable id")
        if texts is not None and len(texts) != self.n:
            raise InputError(f"{len(texts)} texts for {self.n} examples")
        self.ids = ids
        self.texts = texts

    def __len__(self) -> int:
        return self.n

    def batch(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` of every tensor."""
        if self._tensors is not None:
            return tuple(t[start:stop] for t in self._tensors)
        assert self._fetch is not None
        return tuple(self._fetch(start, stop))

    def example_shapes(self) -> list[list[Any]]:
        """``[[shape of one example, dtype], ...]`` per tensor (checked for queries)."""
        first = self.batch(0, 1)
        return [[list(t.shape[1:]), str(t.dtype).replace("torch.", "")] for t in first]

    def ids_hash(self) -> str:
        """SHA-256 of the ids, in order."""
        if isinstance(self.ids, range):
            return f"range({self.ids.start},{self.ids.stop},{self.ids.step})"
        h = hashlib.sha256()
        for i in self.ids:
            h.update(str(i).encode())
            h.update(b"\n")
        return h.hexdigest()

    @classmethod
    def from_texts(
        cls,
        lm: Any,
        texts: Sequence[str],
        answers: Sequence[str] | None = None,
        ids: Sequence[Any] | None = None,
        length: int | None = None,
    ) -> Examples:
        """Causal-LM examples: ``texts`` (prompts) followed by ``answers``, right-padded to ``length``.

        Without ``answers`` every token after the first is scored (the
        language-modelling loss of the whole text). The tensors are
        ``(input_ids, attention_mask, answer_mask)`` for :class:`AnswerMargin` / :class:`AnswerLogProb`.

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
            >>> ex = Examples.from_texts(lm, ["The capital of France is"], [" Paris"])
            >>> [t.shape[0] for t in ex.batch(0, 1)]
            [1, 1, 1]
        """
        if isinstance(texts, str):
            texts = [texts]
        if answers is not None and isinstance(answers, str):
            answers = [answers]
        if answers is not None and len(answers) != len(texts):
            raise InputError(f"{len(answers)} answers for {len(texts)} texts")
        rows, amask = [], []
        for i, t in enumerate(texts):
            p = lm._token_rows([t], None)[0] if t else []
            a = lm.encode(answers[i]) if answers is not None else []
            if answers is not None and not a:
                raise InputError(f"answer {i} is empty")
            r = p + a
            if len(r) < 2:
                raise InputError(f"example {i} has fewer than 2 tokens: nothing to score")
            rows.append(r)
            amask.append(
                [0] * len(p) + [1] * len(a) if answers is not None else [0] + [1] * (len(r) - 1)
            )
        width = length or max(len(r) for r in rows)
        if max(len(r) for r in rows) > width:
            raise InputError(
                f"an example has {max(len(r) for r in rows)} tokens, more than length={width}"
            )
        ids_t = torch.full((len(rows), width), lm.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        ans = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, m) in enumerate(zip(rows, amask)):
            ids_t[i, : len(r)] = torch.tensor(r)
            att[i, : len(r)] = 1
            ans[i, : len(r)] = torch.tensor(m)
        full = [t + (answers[i] if answers is not None else "") for i, t in enumerate(texts)]
        return cls((ids_t, att, ans), ids=ids, texts=full)


def checkpoint_hash(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, values);
    weights accelerate offloads (``device_map`` with ``"cpu"`` / ``"disk"``) are
    read from its weights map, one at a time.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> checkpoint_hash(net) == checkpoint_hash(net)
        True
    """
    h = hashlib.sha256()
    for name, t in state_items(model):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def select_params(model: nn.Module, modules: Sequence[str] | None = None) -> list[str]:
    """Names of the trainable parameters to differentiate (all, or those under ``modules`` prefixes).

    Raises:
        InputError: no parameter matches.

    Example:
        >>> import torch
        >>> select_params(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["0.weight"])
        ['0.weight']
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if modules is not None:
        if isinstance(modules, str):
            modules = [modules]
        names = [
            n for n in names if any(n == m or n.startswith(m.rstrip(".") + ".") for m in modules)
        ]
    if not names:
        raise InputError(f"no trainable parameters match modules={modules!r}")
    return names


class GradientFeaturizer:
    """Projected per-example gradients of ``output`` for batches of examples.

    Args:
        model: the model (put in eval mode).
        output: a :class:`~attrlab.data.outputs.ModelOutput`.
        projector: a :class:`~attrlab.data.project.Projector`.
        modules: parameter-name prefixes to differentiate (default: all trainable).
        mode: ``"vmap"`` (batched ``torch.func``), ``"loop"`` (``torch.func``, one
            example at a time), ``"autograd"`` (plain autograd, one example at a time:
            for models ``torch.func`` cannot run, e.g. a ``torch.autograd.Function``
            without ``setup_context`` such as BLOOM's GELU) or ``"auto"`` (the first
            of vmap, loop, autograd that runs).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(4, 3)
        >>> f = GradientFeaturizer(net, ClassificationMargin(), Projector(dim=None))
        >>> feats, q = f(torch.randn(5, 4), torch.randint(0, 3, (5,)))
        >>> feats.shape, q.shape
        (torch.Size([5, 15]), torch.Size([5]))
    """

    def __init__(
        self,
        model: nn.Module,
        output: ModelOutput,
        projector: Projector,
        modules: Sequence[str] | None = None,
        mode: str = "auto",
    ):
        if mode not in ("auto", "vmap", "loop", "autograd"):
            raise InputError(f"mode must be 'auto', 'vmap', 'loop' or 'autograd', got {mode!r}")
        model.eval()
        self.model = model
        self.output = output
        self.projector = projector
        self.names = select_params(model, modules)
        named = dict(model.named_parameters())
        self.sizes = [named[n].numel() for n in self.names]
        self._params, self._frozen = self._tensors()
        # accelerate's offload loads weights inside each module's forward, which
        # torch.func cannot run: grads() loads them around each batch instead
        self._offloaded = has_offload(model)
        self.mode = mode
        self._requested = mode

        def f(p: dict[str, Tensor], *ex: Tensor) -> tuple[Tensor, Tensor]:
            return output(model, {**p, **self._frozen}, *ex)

        self._f = f
        self._grad = grad(f, has_aux=True)

    def _autograd(self, params: dict[str, Tensor], *ex: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """``self._grad`` by plain autograd (same inputs and outputs)."""
        leaves = {n: t.detach().requires_grad_(n in self.names) for n, t in params.items()}
        with torch.enable_grad():
            out, aux = self._f(leaves, *ex)
            gs = torch.autograd.grad(out, [leaves[n] for n in self.names], allow_unused=True)
        grads = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(self.names, gs)}
        return grads, aux.detach()

    def _tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The model's differentiated parameters and the rest (parameters, buffers)."""
        named = dict(self.model.named_parameters())
        params = {n: named[n].detach() for n in self.names}
        frozen = {n: p.detach() for n, p in named.items() if n not in params}
        frozen.update({n: b for n, b in self.model.named_buffers()})
        return params, frozen

    @property
    def dim(self) -> int:
        return self.projector.out_dim(sum(self.sizes))

    def grads(self, *batch: Tensor) -> tuple[list[Tensor], Tensor]:
        """Raw per-example gradients ``[b, *shape]`` per parameter, and out-to-loss ``[b]``."""
        if not self._offloaded:
            return self._grads(*batch)
        saved = self._params, self._frozen
        with onloaded(self.model):
            self._params, self._frozen = self._tensors()
            try:
                return self._grads(*batch)
            finally:
                self._params, self._frozen = saved

    def _grads(self, *batch: Tensor) -> tuple[list[Tensor], Tensor]:
        if self.mode in ("auto", "vmap"):
            try:
                g, q = vmap(self._grad, in_dims=(None, *[0] * len(batch)))(self._params, *batch)
                if self.mode == "auto":
                    self.mode = "vmap"
                return [g[n] for n in self.names], q
            except (RuntimeError, ValueError, TypeError, NotImplementedError):
                if self.mode == "vmap":
                    raise
                self.mode = "loop"
        one = self._autograd if self.mode == "autograd" else self._grad
        try:
            per = [one(self._params, *[t[i] for t in batch]) for i in range(batch[0].shape[0])]
        except RuntimeError:  # torch.func cannot run the model (e.g. autograd.Function)
            if self._requested != "auto" or self.mode == "autograd":
                raise
            self.mode = "autograd"
            per = [
                self._autograd(self._params, *[t[i] for t in batch])
                for i in range(batch[0].shape[0])
            ]
        return [torch.stack([g[n] for g, _ in per]) for n in self.names], torch.stack(
            [q for _, q in per]
        )

    def example_bytes(self, *example: Tensor) -> int:
        """Estimated bytes one example of a gradient batch needs (for
        :func:`~attrlab.model.budget.grad_batch_size`): the gradients, plus the
        activations a forward on ``example`` (one example, no batch dim) saves
        for its backward, measured once by a probe. Offloaded models, or a probe
        that fails, count the gradients only.

        Example:
            >>> import torch
            >>> net = torch.nn.Linear(4, 3)
            >>> f = GradientFeaturizer(net, ClassificationMargin(), Projector(dim=8))
            >>> f.example_bytes(torch.ones(4), torch.tensor(1)) >= 3 * 15 * 4
            True
        """
        saved = 0
        if not self._offloaded:
            leaves = {n: t.detach().requires_grad_(True) for n, t in self._params.items()}
            shared = [*leaves.values(), *self._frozen.values()]
            try:
                _, saved = saved_tensor_bytes(lambda: self._f(leaves, *example), exclude=shared)
            except Exception:  # noqa: BLE001 - the probe only sizes batches
                saved = 0
        return example_grad_bytes(sum(self.sizes), saved)

    def batch_size(
        self, data: Examples, batch_size: int | None = None, memory_budget: int | str | None = None
    ) -> int:
        """Examples per batch for ``data``: ``batch_size`` if given, else the
        memory model's choice (:func:`~attrlab.model.budget.grad_batch_size`).

        Example:
            >>> import torch
            >>> f = GradientFeaturizer(torch.nn.Linear(4, 3), ClassificationMargin(), Projector(8))
            >>> data = Examples((torch.ones(50, 4), torch.zeros(50, dtype=torch.long)))
            >>> f.batch_size(data), f.batch_size(data, 16)
            (50, 16)
        """
        if batch_size is not None or len(data) == 0:
            return grad_batch_size(0, len(data), batch_size)
        one = tuple(t[0] for t in data.batch(0, 1))
        return grad_batch_size(self.example_bytes(*one), len(data), None, memory_budget)

    @torch.no_grad()
    def _project(self, grads: list[Tensor]) -> Tensor:
        return self.projector.project(grads)

    def __call__(self, *batch: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``[b, k]`` and out-to-loss ``[b]`` of a batch."""
        grads, q = self.grads(*batch)
        return self._project(grads), q.detach().float()


def _default_output(data: Examples) -> ModelOutput:
    shapes = data.example_shapes()
    if len(shapes) == 3 and shapes[0][1] == "int64":
        return AnswerMargin()
    return ClassificationMargin()


def store_config(
    model: nn.Module,
    data: Examples,
    featurizer: GradientFeaturizer,
    batch_size: int,
    shard_size: int,
    dtype: str,
    model_id: str | None,
) -> dict[str, Any]:
    """The manifest config of a featurization (what must match to resume or score)."""
    return {
        "model_id": model_id or type(model).__name__,
        "checkpoint": checkpoint_hash(model),
        "projection": featurizer.projector.spec(),
        "output": featurizer.output.spec(),
        "params": featurizer.names,
        "n_params": int(sum(featurizer.sizes)),
        "n": len(data),
        "dim": featurizer.dim,
        "dtype": dtype,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "ids_hash": data.ids_hash(),
        "example_shapes": data.example_shapes(),
    }


def _write_labels(store: FeatureStore, data: Examples) -> None:
    """Save ids (unless they are the row index) and texts beside the features, once."""
    import json

    if not isinstance(data.ids, range) and not store.has_file("ids.json"):
        ids = [i if isinstance(i, (int, str)) else str(i) for i in data.ids]
        store.write_file("ids.json", json.dumps(ids).encode())
    if data.texts is not None and not store.has_file("texts.json"):
        store.write_file("texts.json", json.dumps(list(data.texts)).encode())


def featurize(
    model: nn.Module,
    data: Examples | Sequence[Tensor],
    path: str | Path,
    output: ModelOutput | None = None,
    proj_dim: int | None = 512,
    seed: int = 0,
    projector: Projector | None = None,
    modules: Sequence[str] | None = None,
    batch_size: int = 64,
    shard_size: int = 4096,
    dtype: str = "float32",
    model_id: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    finalize: bool = True,
    mode: str = "auto",
    progress: bool = False,
    verify: bool = True,
    claim_timeout: float = CLAIM_TIMEOUT,
) -> FeatureStore:
    """Featurize ``data`` into the store at ``path`` (resuming and repairing whatever is there).

    Shards already written are kept if they pass their checks; damaged ones
    (wrong size or checksum, non-finite values, copied from another store) are
    recomputed. Several processes may featurize into one store at once: they
    claim shards and compute each one once between them (each waits for the
    others' shards before it finalizes).

    Args:
        model: a classifier or causal LM (an ``attrlab.LM`` is unwrapped).
        data: :class:`Examples` (or a tuple of tensors ``(x, y)``; ids = row index).
        path: store directory.
        output: model output function (default: :class:`ClassificationMargin`, or
            :class:`AnswerMargin` for :meth:`Examples.from_texts` data).
        proj_dim, seed: projection dimension (None = raw gradients) and seed.
        projector: a :class:`Projector` (overrides ``proj_dim``/``seed``).
        modules: parameter-name prefixes to differentiate (default: all).
        batch_size: examples per vmapped batch; shard_size: examples per shard file.
        dtype: ``"float32"`` or ``"float16"`` for stored features.
        model_id: a name stored in the manifest.
        rank, world_size: this process's share of the shards (default: from
            ``torch.distributed`` if initialized, else the whole set).
        finalize: compute ``Phi^T Phi`` when done (all-reduced across ranks under torch.distributed).
        mode: gradient mode of :class:`GradientFeaturizer`.
        progress: show a progress bar.
        verify: hash every shard already in the store before resuming (recomputing
            those that fail); ``False`` checks only their sizes (faster for huge stores).
        claim_timeout: seconds after which another writer's claim on a shard that
            it has not touched (it touches it after every batch) is taken over;
            claims of dead processes on this host are taken over at once.

    Raises:
        StoreMismatchError: ``path`` holds a store for another checkpoint, projection or dataset.
        InputError: bad sizes, data without stable ids, or non-finite features.
    """
    from .distributed import dist_info, finalize_distributed

    if hasattr(model, "model") and hasattr(model, "adapter"):  # an attrlab.LM
        model_id = model_id or getattr(model, "name", None)
        model = model.model  # type: ignore[assignment]
    if not isinstance(data, Examples):
        data = Examples(data)
    if batch_size <= 0 or shard_size <= 0:
        raise InputError("batch_size and shard_size must be positive")
    if dtype not in ("float32", "float16"):
        raise InputError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    projector = projector or Projector(proj_dim, seed=seed)
    feat = GradientFeaturizer(model, output or _default_output(data), projector, modules, mode)
    config = store_config(model, data, feat, batch_size, shard_size, dtype, model_id)
    r, w, use_dist = dist_info(rank, world_size)
    store = FeatureStore.create(path, config)
    if verify:
        store.verify()  # damaged files now count as missing
    _write_labels(store, data)
    n = len(data)
    planned = [(a, min(n, a + shard_size)) for a in range(0, n, shard_size)]
    mine = [rng for j, rng in enumerate(planned) if j % w == r]
    pending = [rng for rng in mine if rng in set(store.missing())]
    bar = tqdm(
        total=sum(b - a for a, b in pending),
        disable=not progress,
        desc=f"featurize[{r}/{w}]",
        unit="ex",
    )
    while pending:
        worked = False
        for a, b in pending:
            claim = store.try_claim(a, b, timeout=claim_timeout)
            if claim is None:  # done meanwhile, or another writer is computing it
                continue
            try:
                feats = np.empty((b - a, feat.dim), np.float32)
                qs = np.empty((b - a,), np.float32)
                for s in range(a, b, batch_size):
                    e = min(b, s + batch_size)
                    f, q = feat(*data.batch(s, e))
                    feats[s - a : e - a] = f.numpy()
                    qs[s - a : e - a] = q.numpy()
                    claim.touch()
                    bar.update(e - s)
                store.write_shard(a, feats, qs)
            finally:
                claim.release()
            worked = True
        done = set(store.done_ranges())
        pending = [rng for rng in pending if rng not in done]
        if pending and not worked:
            time.sleep(0.05)  # the rest is being computed by other writers
    bar.close()
    if finalize:
        if use_dist:
            finalize_distributed(store, mine)
        elif w == 1:
            store.finalize()
    return store


def query_features(
    model: nn.Module,
    queries: Examples | Sequence[Tensor],
    store: FeatureStore,
    output: ModelOutput | None = None,
    batch_size: int | None = None,
    mode: str = "auto",
    check_checkpoint: bool = True,
    projector: Projector | None = None,
    memory_budget: int | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Features ``[m, k]`` and out-to-loss ``[m]`` of query examples, with the store's projection.

    Args:
        batch_size: queries per vmapped batch; None: as many as the memory
            budget allows (:meth:`GradientFeaturizer.batch_size`), which for a
            small model is all of them. Features do not depend on it (beyond
            float round-off).
        projector: the store's projection, to reuse one whose blocks are already
            generated (several checkpoints share one projection); built from the
            store's manifest if None.
        memory_budget: bytes (or ``"2GB"``) for the automatic batch size.

    Raises:
        StoreMismatchError: ``model`` is not the checkpoint the store was written for.
        InputError: the queries' shapes do not match the training examples'.
    """
    if hasattr(model, "model") and hasattr(model, "adapter"):
        model = model.model  # type: ignore[assignment]
    if not isinstance(queries, Examples):
        queries = Examples(queries)
    man = store.manifest
    want = man.get("example_shapes")
    got = queries.example_shapes()
    if want is not None and [s[0] for s in want] != [s[0] for s in got]:
        # token sequences may differ in length: only the non-sequence dims must match
        if not (len(want) == len(got) == 3 and all(len(s[0]) == 1 for s in got)):
            raise InputError(
                f"query examples have shapes {got} but the training examples in {store.path} have {want}"
            )
    if check_checkpoint:
        store.check({"checkpoint": checkpoint_hash(model)})
    if projector is None:
        proj = Projector.from_spec(man["projection"])
    elif projector.spec() != man["projection"]:
        raise InputError(
            f"projector {projector.spec()} is not the projection of {store.path} ({man['projection']})"
        )
    else:
        proj = projector
    if output is None:
        output = {
            "classification_margin": ClassificationMargin,
            "class_logprob": ClassLogProb,
            "answer_logprob": AnswerLogProb,
            "answer_margin": AnswerMargin,
        }[man["output"]["name"]]()
    feat = GradientFeaturizer(model, output, proj, modules=man["params"], mode=mode)
    if feat.names != man["params"]:
        raise InputError(
            f"the model's parameters {feat.names[:3]}… differ from the store's {man['params'][:3]}…"
        )
    batch_size = feat.batch_size(queries, batch_size, memory_budget)
    fs, qs = [], []
    for s in range(0, len(queries), batch_size):
        f, q = feat(*queries.batch(s, min(len(queries), s + batch_size)))
        fs.append(f)
        qs.append(q)
    return torch.cat(fs), torch.cat(qs)
