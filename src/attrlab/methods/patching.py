"""Exact activation patching: replace one unit's activation with its value from
another run and measure the target.

Two runs of the same length: the *clean* prompt and a *corrupted* one
(a counterfactual prompt, the clean prompt with Gaussian noise on some token
embeddings, or a zero / mean / resampled replacement). **Noising** runs the
clean prompt with one unit taken from the corrupted run; **denoising** runs the
corrupted prompt with one unit taken from the clean run.

Speed: every unit is one row of a batched forward (paired-index
:class:`~attrlab.model.interventions.Intervention`), units of one layer share
a forward that starts *at that layer* from the cached residual stream of the
base run (layers below the patch are not recomputed), and only the last
position is unembedded. Rows per forward, and which neighbouring positions
share one, follow the cost model of :mod:`attrlab.model.budget` (the model's
width, the prompt length, the memory budget); ``batch_size`` forces the rows.

The low-level entry point :func:`patch_sweep` returns raw target values per
prompt and unit; :class:`ActivationPatching` (``method="patch"``) turns them into
an :class:`~attrlab.result.Attribution` with a metric.

Example:
    >>> import attrlab as al
    >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
    >>> r = al.attribute(lm, "When Mary and John went to the store, John gave a drink to",
    ...                  target=(" Mary", " John"), units="heads", method="patch",
    ...                  counterfactual="When Mary and John went to the store, Mary gave a drink to")
    >>> len(r) == lm.cfg.n_layers * lm.cfg.n_heads
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from .. import ablations as A
from ..ablations import Ablation
from ..errors import IndexRangeError, InputError, SiteNotExposedError
from ..model.masked import INDEX_AXES, MaskedRunner, SiteUnit
from ..model.wrapper import LM, Batch, Inputs
from ..result import Attribution
from ..targets import KL, LogitDiff, LogProb, Prob, Target, TopToken, _TokenTarget
from ..targets import resolve as resolve_target
from ..units.base import Units
from ..units.components import (
    AttnOut,
    Experts,
    Heads,
    Layers,
    MlpOut,
    Neurons,
    Resid,
    donor_values,
    embedding_std,
    label_columns,
    locations,
    noise_interventions,
)
from .base import Method, check_float, check_int, register

__all__ = [
    "PatchUnit",
    "PatchSweep",
    "Noise",
    "Zero",
    "Mean",
    "Resample",
    "Corruption",
    "patch_sweep",
    "units_for",
    "embedding_std",
    "ActivationPatching",
    "PatchingWarning",
]

#: site kinds that can be patched, and the name of their unit axis
PATCH_KINDS = {k: v for k, v in INDEX_AXES.items() if k != "embed"}

#: one patch: a site location (``blocks.{layer}.{kind}``, position, index)
PatchUnit = SiteUnit


class PatchingWarning(UserWarning):
    """A patching result is degenerate (e.g. clean and corrupt metrics are equal)."""


def Noise(  # noqa: N802 - a deprecated alias that builds the ablation object
    positions: Sequence[int] | None = None, scale: float | None = None, seed: int = 0
) -> Ablation:
    """Deprecated alias of :class:`attrlab.ablations.Noise` (``scale`` is its ``std``).

    Example:
        >>> Noise(positions=[1, 2], seed=0).std is None
        True
    """
    warnings.warn(
        "attrlab.methods.patching.Noise is deprecated; use al.ablations.Noise(std=, seed=, "
        "positions=)",
        DeprecationWarning,
        stacklevel=2,
    )
    return A.Noise(std=scale, seed=seed, positions=positions)


Corruption = Union[A.Noise, A.Zero, A.Mean, A.Resample]
#: the ablation classes, under the names patching has always used
Zero, Mean, Resample = A.Zero, A.Mean, A.Resample


# ------------------------------------------------------------ the sweep
@dataclass
class PatchSweep:
    """Raw result of :func:`patch_sweep`.

    Attributes:
        units: the patches, in column order.
        patched: ``[n_prompts, n_units]`` target value of each patched run.
        clean: ``[n_prompts]`` target on the clean run.
        corrupt: ``[n_prompts]`` target on the corrupted run (NaN for zero/mean
            corruption, which has no corrupted run).
        direction: ``"noising"`` (base run = clean) or ``"denoising"`` (base = corrupt).
        n_forwards: batched forward passes used for the patched runs.
    """

    units: list[PatchUnit]
    patched: Tensor
    clean: Tensor
    corrupt: Tensor
    direction: str
    n_forwards: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> Tensor:
        """``[n_prompts]`` target on the unpatched base run."""
        return self.clean if self.direction == "noising" else self.corrupt

    @property
    def effects(self) -> Tensor:
        """``[n_prompts, n_units]`` patched minus base."""
        return self.patched - self.base[:, None]


def units_for(lm: LM, units: Units, n_pos: int, site: str = "z") -> list[PatchUnit]:
    """The :class:`PatchUnit` list that a unit-kind object covers, in label order.

    ``n_pos`` is the prompt length (for per-position units). ``site`` picks the head activation for :class:`~attrlab.units.Heads`:
    ``"z"`` (head output, default), ``"q"``, ``"k"``, ``"v"``; ``"pattern"``
    raises :class:`SiteNotExposedError` (attention weights are read-only).

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> len(units_for(lm, al.units.Heads(layers=[0]), n_pos=5))
        4
    """
    if isinstance(units, Layers):
        raise InputError(
            "activation patching of whole layers: use units='resid' (the residual stream "
            "entering each layer), 'attn' or 'mlp'"
        )
    if not isinstance(units, (Heads, Neurons, Experts, Resid, AttnOut, MlpOut)):
        raise InputError(f"activation patching does not support units={units.kind!r}")
    locs, _, _ = locations(lm, units, n_pos, site)  # the one labelling path for components
    return locs


def _expand_units(
    lm: LM, units: Units | Sequence[PatchUnit], n_pos: int, site: str
) -> list[PatchUnit]:
    if isinstance(units, Units):
        out = units_for(lm, units, n_pos, site)
    else:
        out = list(units)
    if not out:
        raise InputError("no units to patch")
    for u in out:
        if not isinstance(u, PatchUnit):
            raise InputError(f"units must be an al.units object or PatchUnit list, got {u!r}")
        if u.kind == "attn.pattern":
            raise SiteNotExposedError(
                f"{u.site} is read-only: attention weights cannot be patched; patch attn.q or "
                "attn.k instead"
            )
        if u.kind not in PATCH_KINDS:
            raise InputError(
                f"cannot patch site kind {u.kind!r}; choose from {sorted(PATCH_KINDS)}"
            )
        if not 0 <= u.layer < lm.cfg.n_layers:
            raise IndexRangeError(f"{u}: layer out of range 0..{lm.cfg.n_layers - 1}")
        if u.position is not None and not -n_pos <= u.position < n_pos:
            raise IndexRangeError(f"{u}: position out of range for a {n_pos}-token prompt")
        if u.kind == "resid_mid" and lm.cfg.parallel_residual:
            raise SiteNotExposedError(f"{u.site}: this model has a parallel residual, no resid_mid")
    return out


def patch_sweep(
    lm: LM,
    clean: Inputs,
    corrupt: Inputs | Corruption,
    target: Any,
    units: Units | Sequence[PatchUnit],
    *,
    direction: str = "noising",
    site: str = "z",
    batch_size: int | None = None,
    progress: bool = False,
    reuse_prefix: bool = True,
    memory_budget: int | str | None = None,
) -> PatchSweep:
    """Exact activation patching of every unit; raw target values, one forward row per unit.

    Args:
        lm: the wrapped model.
        clean: the clean prompt(s) (``n_prompts`` rows).
        corrupt: a counterfactual prompt (or one per clean prompt) of the same
            token length, or a corruption object (:class:`Noise`,
            :class:`Zero`, :class:`Mean`, :class:`Resample`).
        target: anything :func:`attrlab.targets.resolve` reads (a token, a
            pair for a logit difference, a :class:`~attrlab.targets.Target`).
        units: an ``al.units`` object (:class:`~attrlab.units.Heads`,
            ``Resid``, ``AttnOut``, ``MlpOut``, ``Neurons``; ``per_position``
            picks per-position units) or an explicit list of :class:`PatchUnit`.
        direction: ``"noising"`` (clean run, patch in corrupt activations) or
            ``"denoising"`` (corrupt run, patch in clean activations).
        site: for head units, ``"z"`` (output), ``"q"``, ``"k"`` or ``"v"``.
        batch_size: maximum rows (units x prompts) of one forward; None: the
            cost model's choice (:func:`attrlab.model.budget.efficient_rows`:
            enough rows that a forward's fixed cost is small for this model's
            width and prompt length), lowered to what fits ``memory_budget``.
        progress: show a tqdm bar.
        reuse_prefix: for per-position units, reuse the base run's key/value
            cache of the positions before the patch (they are unchanged) instead
            of recomputing them; falls back when the model's cache cannot be cropped.

    Returns:
        :class:`PatchSweep` with ``patched [n_prompts, n_units]``, ``clean``,
        ``corrupt`` (target values), and ``effects`` (patched minus base).

    Raises:
        CounterfactualLengthError: the counterfactual tokenizes to another length.
        SiteNotExposedError: a site that cannot be written (``attn.pattern``).
        InputError: denoising with a zero/mean corruption, bad options.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("llama"))
        >>> sw = patch_sweep(lm, "a b c d", "a c c d", " a", al.units.Resid())
        >>> tuple(sw.patched.shape)
        (1, 8)
    """
    tgt = target if isinstance(target, Target) else resolve_target(target, lm)
    if isinstance(target, Target):
        tgt.bind(lm)
    batch = tgt.prepare(lm, lm.tokenize(clean))
    return _sweep(
        lm,
        batch,
        corrupt,
        tgt,
        units,
        prepare=lambda b: tgt.prepare(lm, b),
        direction=direction,
        site=site,
        batch_size=batch_size,
        progress=progress,
        reuse_prefix=reuse_prefix,
        memory_budget=memory_budget,
    )


def _ablation_of(corrupt: Any) -> Ablation:
    if isinstance(corrupt, Ablation):
        return corrupt
    return A.Counterfactual(corrupt)


def _sweep(
    lm: LM,
    batch: Batch,
    corrupt: Inputs | Corruption,
    tgt: Target,
    units: Units | Sequence[PatchUnit],
    *,
    prepare: Callable[[Batch], Batch],
    direction: str = "noising",
    site: str = "z",
    batch_size: int | None = None,
    progress: bool = False,
    reuse_prefix: bool = True,
    memory_budget: int | str | None = None,
) -> PatchSweep:
    """:func:`patch_sweep` on a clean ``batch`` the target has already prepared
    (the continuation of a :class:`~attrlab.targets.ContinuationLogProb` is
    appended exactly once, here by the caller); ``prepare`` is applied to the
    tokenized counterfactual / reference prompts only.

    One engine: the masked runs of :class:`attrlab.model.masked.MaskedRunner`
    (the component unit kinds' ``f``) with one ablated unit per row."""
    if direction not in ("noising", "denoising"):
        raise InputError(f"direction must be 'noising' or 'denoising', got {direction!r}")
    if batch_size is not None and batch_size < 1:
        raise InputError("batch_size must be >= 1")
    n_prompts, n_pos = batch.shape
    plist = _expand_units(lm, units, n_pos, site)
    abl = _ablation_of(corrupt)
    if direction == "denoising" and not abl.has_run:
        raise InputError(
            "denoising needs a corrupted run to patch into; zero and mean ablations only "
            "support direction='noising'"
        )
    sites = sorted({u.site for u in plist})
    donors, run = donor_values(lm, batch, abl, sites, prepare)
    opts: dict[str, Any] = dict(
        batch_size=batch_size, memory_budget=memory_budget, progress=progress
    )
    if direction == "noising":
        runner = MaskedRunner(lm, batch, tgt, plist, donors, reuse_prefix=reuse_prefix, **opts)
        clean_val = runner.base_values
        corrupt_val = torch.full_like(clean_val, float("nan"))
        if run is not None:
            logits, cbatch = run
            corrupt_val = tgt(logits, cbatch).detach().float().cpu()
    else:
        assert run is not None
        logits, cbatch = run
        base_ivs = noise_interventions(lm, batch, abl) if isinstance(abl, A.Noise) else []
        with torch.no_grad():
            clean_logits, clean_cache = lm.run(batch, cache=sites, last_only=tgt.next_token)
        clean_val = tgt(clean_logits, batch).detach().float().cpu()
        runner = MaskedRunner(
            lm, cbatch, tgt, plist, dict(clean_cache), reuse_prefix=reuse_prefix,
            base_interventions=base_ivs, **opts,
        )  # fmt: skip
        corrupt_val = runner.base_values
    keep = ~torch.eye(len(plist), dtype=torch.bool)
    patched = runner.values(keep, per_prompt=True).T  # [n_prompts, n_units]
    return PatchSweep(
        units=plist,
        patched=patched,
        clean=clean_val,
        corrupt=corrupt_val,
        direction=direction,
        n_forwards=runner.n_forwards,
        meta={
            "corruption": abl.name,
            "n_positions": n_pos,
            "batch": batch,
            "batch_size": runner.batch_size,
        },
    )


# ------------------------------------------------------------ the method
_METRICS = ("logit_diff", "normalized", "logprob", "prob", "kl")


def _metric_target(metric: str, target: Target, lm: LM, batch: Batch) -> Target:
    if metric in ("logit_diff", "normalized"):
        return target
    if metric in ("logprob", "prob"):
        if isinstance(target, LogitDiff) or not isinstance(target, _TokenTarget):
            raise InputError(
                f"metric={metric!r} needs a single-token target (e.g. target=' Mary'); "
                f"got {target.describe()}"
            )
        tok: Any = target.ids if isinstance(target, TopToken) else target.token
        cls = LogProb if metric == "logprob" else Prob
        return cls(tok.tolist() if isinstance(tok, Tensor) else tok).bind(lm)
    # kl: reference = clean next-token distribution
    logits, _ = lm.run(batch, last_only=True)
    return KL(reference_logits=logits[:, -1].detach())


@register("patch", ("heads", "resid", "attn", "mlp", "neurons", "experts"))
class ActivationPatching(Method):
    """Exact activation patching (``method="patch"``).

    Options:
        direction: ``"noising"`` (default) or ``"denoising"``.
        corruption: ``None``/``"counterfactual"`` (needs ``counterfactual=``),
            ``"noise"`` (Gaussian noise on ``noise_positions`` embeddings,
            ``noise_scale`` default 3 x embedding std, ``seed``), ``"zero"``,
            ``"mean"`` (over ``reference`` prompts), ``"resample"`` (from
            ``reference``), or a corruption object.
        metric: ``"logit_diff"`` (the unit's contribution to the target: the
            base run minus the patched run when noising, the patched run minus
            the corrupted base when denoising; ``r.effect_of_patching()`` gives
            the patched-minus-base view; any logit / logit difference target), ``"normalized"``
            ((patched - corrupt) / (clean - corrupt): 1 = clean behaviour,
            0 = corrupt), ``"logprob"`` / ``"prob"`` (change of the target
            token's; single-token targets), ``"kl"`` (KL(clean || patched)).
        site: head activation to patch for ``units="heads"``: ``"z"``, ``"q"``,
            ``"k"``, ``"v"``.
        per_prompt: scores ``[n_prompts, n_units]`` instead of the mean over prompts.
        batch_size: rows per forward (None: the cost model's choice, within
            ``memory_budget``; see :mod:`attrlab.model.budget`); progress: tqdm bar.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> r = al.attribute(lm, "a b c d", target=" a", units="resid", method="patch",
        ...                  corruption="noise", noise_positions=[1])
        >>> set(r.to_pandas().columns) >= {"layer", "position", "token", "score"}
        True
    """

    def __init__(
        self,
        direction: str = "noising",
        corruption: str | Corruption | None = None,
        metric: str = "logit_diff",
        site: str = "z",
        reference: Any = None,
        noise_positions: Sequence[int] | None = None,
        noise_scale: float | None = None,
        seed: int = 0,
        per_prompt: bool = False,
        batch_size: int | None = None,
        progress: bool = False,
        memory_budget: int | str | None = None,
    ):
        if metric not in _METRICS:
            raise InputError(f"metric must be one of {_METRICS}, got {metric!r}")
        if direction not in ("noising", "denoising"):
            raise InputError(f"direction must be 'noising' or 'denoising', got {direction!r}")
        self.direction = direction
        self.corruption = corruption
        self.metric = metric
        self.site = site
        self.reference = reference
        self.noise_positions = list(noise_positions) if noise_positions is not None else None
        self.noise_scale = check_float("patch", "noise_scale", noise_scale, optional=True)
        self.seed = check_int("patch", "seed", seed, minimum=0)
        self.per_prompt = per_prompt
        self.batch_size = check_int("patch", "batch_size", batch_size, optional=True)
        self.progress = progress
        self.memory_budget = memory_budget

    def params(self) -> dict[str, Any]:
        p = super().params()
        if not isinstance(self.corruption, (str, type(None))):
            p["corruption"] = repr(self.corruption)
        return p

    def _corruption(self, counterfactual: Inputs | None) -> Any:
        c = self.corruption
        if c is None or c == "counterfactual":
            if counterfactual is None:
                raise InputError(
                    "activation patching needs counterfactual= (a corrupted prompt of the same "
                    "token length) or corruption='noise' | 'zero' | 'mean' | 'resample'"
                )
            return counterfactual
        if isinstance(c, A.Ablation):
            return c
        if c == "noise":
            return A.Noise(std=self.noise_scale, seed=self.seed, positions=self.noise_positions)
        if c == "zero":
            return Zero()
        if c == "mean":
            return Mean(self.reference)
        if c == "resample":
            return Resample(self.reference, self.seed)
        raise InputError(
            f"unknown corruption {c!r}: use 'counterfactual', 'noise', 'zero', 'mean' or 'resample'"
        )

    def attribute(
        self,
        lm: LM,
        inputs: Inputs,
        target: Target,
        units: Units,
        counterfactual: Inputs | None = None,
    ) -> Attribution:
        corrupt = self._corruption(counterfactual)
        if self.metric == "normalized" and isinstance(corrupt, (Zero, Mean)):
            raise InputError(
                "metric='normalized' needs a corrupted run (counterfactual, noise or resample); "
                "zero and mean ablations have none: use metric='logit_diff'"
            )
        batch = target.prepare(lm, lm.tokenize(inputs))
        mtarget = _metric_target(self.metric, target, lm, batch)
        # the batch already holds what the target appends (e.g. a continuation):
        # the sweep must not prepare it again, only the counterfactual / references
        sw = _sweep(
            lm,
            batch,
            corrupt,
            mtarget,
            units,
            prepare=lambda b: target.prepare(lm, b),
            direction=self.direction,
            site=self.site,
            batch_size=self.batch_size,
            progress=self.progress,
            memory_budget=self.memory_budget,
        )
        diagnostics: dict[str, Any] = {
            "clean": sw.clean.mean().item(),
            "corrupt": sw.corrupt.mean().item(),
            "n_forwards": sw.n_forwards,
            "corruption": sw.meta["corruption"],
        }
        if self.metric == "kl":
            per = sw.patched
            mean = per.mean(0)
        elif self.metric == "normalized":
            per, mean, ok = _normalize(sw)
            diagnostics["normalized"] = ok
        else:
            # one sign: the unit's contribution. Noising: base - patched (the
            # effect of patching, patched - base, is r.effect_of_patching());
            # denoising: patched - corrupted base (already a contribution)
            per = -sw.effects if self.direction == "noising" else sw.effects
            mean = per.mean(0)
        scores = per if self.per_prompt else mean
        return Attribution(
            scores,
            units=_labels(lm, sw.units, batch, units),
            unit_kind=units.kind,
            method="patch",
            target=(
                target.describe()
                if self.metric in ("logit_diff", "normalized")
                else mtarget.describe()
            ),
            params={**self.params(), "units": units.params()},
            model_id=lm.name,
            diagnostics=diagnostics,
            rows={"prompt": list(range(batch.shape[0]))} if self.per_prompt else None,
            meta={"metric": self.metric, "direction": self.direction},
            extra={"patched": sw.patched, "clean": sw.clean, "corrupt": sw.corrupt},
        )


def _normalize(sw: PatchSweep) -> tuple[Tensor, Tensor, bool]:
    """Per prompt and for the mean: (patched - corrupt) / (clean - corrupt)."""
    denom = sw.clean - sw.corrupt  # [n_prompts]
    mean_denom = denom.mean()
    scale = max(sw.clean.abs().mean().item(), sw.corrupt.abs().mean().item(), 1e-12)
    if abs(mean_denom.item()) <= 1e-6 * scale or not bool((denom.abs() > 1e-6 * scale).all()):
        warnings.warn(
            "normalized metric: the clean and corrupted runs give the same target value "
            f"(clean={sw.clean.tolist()}, corrupt={sw.corrupt.tolist()}), so (patched - corrupt) / "
            "(clean - corrupt) is undefined; returning the unnormalized patched - corrupt instead. "
            "Pick a counterfactual that changes the answer.",
            PatchingWarning,
            stacklevel=3,
        )
        per = sw.patched - sw.corrupt[:, None]
        return per, per.mean(0), False
    per = (sw.patched - sw.corrupt[:, None]) / denom[:, None]
    mean = (sw.patched.mean(0) - sw.corrupt.mean()) / mean_denom
    return per, mean, True


def _labels(
    lm: LM, plist: list[PatchUnit], batch: Batch, units: Any = None
) -> dict[str, list[Any]]:
    """Label columns: a unit kind's own (:func:`attrlab.units.components.locations`),
    or for an explicit patch list: layer, site, [head | neuron], position, token."""
    if isinstance(units, Units):
        _, _, labels = locations(lm, units, batch.shape[1], _site_of(plist))
        toks = (
            lm.to_str_tokens(batch.input_ids[0])
            if lm.tokenizer is not None
            else [str(int(t)) for t in batch.input_ids[0]]
        )
        return label_columns(labels, toks)
    ids = batch.input_ids[0]
    toks = lm.to_str_tokens(ids) if lm.tokenizer is not None else [str(int(t)) for t in ids]
    cols: dict[str, list[Any]] = {"layer": [u.layer for u in plist]}
    kinds = {u.kind for u in plist}
    if len(kinds) > 1 or not any(u.index is not None for u in plist):
        cols["site"] = [u.kind for u in plist]
    if any(u.index is not None for u in plist):
        name = (
            "neuron"
            if kinds == {"mlp.neurons"}
            else "head"
            if kinds <= {"attn.z", "attn.q", "attn.head_out"}
            else "kv_head"
            if kinds <= {"attn.k", "attn.v"}
            else "index"
        )
        cols[name] = [-1 if u.index is None else u.index for u in plist]
    if any(u.position is not None for u in plist):
        cols["position"] = [-1 if u.position is None else u.position % len(toks) for u in plist]
        cols["token"] = ["" if u.position is None else toks[u.position] for u in plist]
    return cols


def _site_of(plist: list[PatchUnit]) -> str:
    kind = plist[0].kind if plist else "attn.z"
    return kind.split(".", 1)[1] if kind.startswith("attn.") and kind != "attn.out" else "z"
