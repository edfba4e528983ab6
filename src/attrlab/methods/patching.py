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
position is unembedded. ``batch_size`` bounds the rows of one forward.

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

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from ..errors import IndexRangeError, InputError, SiteNotExposedError
from ..model.budget import batch_size_for
from ..model.interventions import Intervention
from ..model.wrapper import LM, Batch, Inputs
from ..result import Attribution
from ..targets import KL, LogitDiff, LogProb, Prob, Target, TopToken, _TokenTarget
from ..targets import resolve as resolve_target
from ..units.base import Units
from ..units.components import AttnOut, Heads, Layers, MlpOut, Neurons, Resid
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

#: site kinds that can be patched, and whether their units have an index axis
PATCH_KINDS = {
    "resid_pre": None,
    "attn.out": None,
    "mlp.out": None,
    "resid_mid": None,
    "resid_post": None,
    "attn.z": "head",
    "attn.q": "head",
    "attn.k": "kv_head",
    "attn.v": "kv_head",
    "attn.head_out": "head",
    "mlp.neurons": "neuron",
}


class PatchingWarning(UserWarning):
    """A patching result is degenerate (e.g. clean and corrupt metrics are equal)."""


# ---------------------------------------------------------------- units
@dataclass(frozen=True)
class PatchUnit:
    """One patch: the site ``blocks.{layer}.{kind}`` at ``position`` (None = every
    position) and ``index`` (a head for ``attn.z/q/head_out``, a key/value head
    for ``attn.k/v``, a neuron for ``mlp.neurons``; None = the whole site).

    Example:
        >>> PatchUnit(3, "attn.z", position=5, index=2).site
        'blocks.3.attn.z'
    """

    layer: int
    kind: str
    position: int | None = None
    index: int | None = None

    @property
    def site(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"


# ----------------------------------------------------------- corruptions
@dataclass
class Noise:
    """Causal-tracing corruption: the clean prompt with Gaussian noise added to the
    token embeddings (site ``embed``) at ``positions`` (None = every position).

    ``scale=None`` uses 3 x the standard deviation of the embedding module's
    outputs over the whole vocabulary (ROME's choice of 3 sigma). Seeded.

    Example:
        >>> Noise(positions=[1, 2], seed=0).scale is None
        True
    """

    positions: Sequence[int] | None = None
    scale: float | None = None
    seed: int = 0


@dataclass
class Zero:
    """Replace the unit's activation by zeros (noising only).

    Example:
        >>> Zero()
        Zero()
    """


@dataclass
class Mean:
    """Replace the unit's activation by its mean over ``reference`` prompts (noising
    only). Same token length as the prompt: mean per position; otherwise the
    mean over all real positions, used at every position.

    Example:
        >>> Mean(["a b c", "d e f"]).reference[0]
        'a b c'
    """

    reference: Any = None


@dataclass
class Resample:
    """The corrupted run is a reference prompt drawn at random (seeded) for each
    clean prompt; references must tokenize to the prompt's length.

    Example:
        >>> Resample(["a b c", "d e f"], seed=1).seed
        1
    """

    reference: Any = None
    seed: int = 0


Corruption = Union[Noise, Zero, Mean, Resample]


def embedding_std(lm: LM, chunk: int = 8192) -> float:
    """Standard deviation of the token-embedding module's outputs over the vocabulary.

    Example:
        >>> import attrlab as al
        >>> lm = al.wrap(*al.testing.tiny_model("gpt2"))
        >>> embedding_std(lm) > 0
        True
    """
    emb = lm.adapter.token_embedding()
    total, total_sq, n = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, lm.cfg.d_vocab, chunk):
            ids = torch.arange(start, min(start + chunk, lm.cfg.d_vocab), device=lm.device)
            e = emb(ids[None]).double()
            total += float(e.sum())
            total_sq += float((e * e).sum())
            n += e.numel()
    mean = total / n
    return math.sqrt(max(total_sq / n - mean * mean, 0.0))


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
    c = lm.cfg
    layers = units.layer_list(c.n_layers) if hasattr(units, "layer_list") else []

    def positions_of() -> list[int | None]:
        return list(range(n_pos)) if getattr(units, "per_position", False) else [None]

    out: list[PatchUnit] = []
    if isinstance(units, Heads):
        if site == "pattern":
            raise SiteNotExposedError(
                "patching blocks.{l}.attn.pattern is not supported: attention weights are "
                "read-only in attrlab (the models' attention implementations compute them "
                "internally). Patch site='q' or site='k' (which change the pattern) instead."
            )
        if site not in ("z", "q", "k", "v", "head_out"):
            raise InputError(f"site must be 'z', 'q', 'k', 'v' or 'head_out', got {site!r}")
        kind = f"attn.{site}"
        n_idx = c.n_kv_heads if site in ("k", "v") else c.n_heads
        heads = units.head_list(n_idx) if units.heads is not None else list(range(n_idx))
        for layer in layers:
            for pos in positions_of():
                for h in heads:
                    out.append(PatchUnit(layer, kind, pos, h))
    elif isinstance(units, Neurons):
        neurons = units.neuron_list(c.d_mlp)
        for layer in layers:
            for pos in positions_of():
                for n in neurons:
                    out.append(PatchUnit(layer, "mlp.neurons", pos, n))
    elif isinstance(units, (Resid, AttnOut, MlpOut)):
        kind = {Resid: "resid_pre", AttnOut: "attn.out", MlpOut: "mlp.out"}[type(units)]
        for layer in layers:
            for pos in positions_of():
                out.append(PatchUnit(layer, kind, pos, None))
    elif isinstance(units, Layers):
        raise InputError(
            "activation patching of whole layers: use units='resid' (the residual stream "
            "entering each layer), 'attn' or 'mlp'"
        )
    else:
        raise InputError(f"activation patching does not support units={units.kind!r}")
    return out


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


def _donor_acts(
    lm: LM,
    batch: Batch,
    corrupt: Any,
    sites: list[str],
    resid_sites: list[str],
    target: Target,
    prepare: Callable[[Batch], Batch],
) -> tuple[Batch | None, list[Intervention], dict[str, Tensor], Tensor | None, str]:
    """Run the corrupted input; return (corrupt batch, its interventions, cached
    site values, its logits, corruption name). Zero/mean have no corrupted run.

    ``batch`` is the clean batch as the target prepared it (e.g. prompt plus
    continuation); ``prepare`` does the same to each tokenized reference or
    counterfactual prompt, so both runs have the same tokens after the prompt."""
    if isinstance(corrupt, Zero):
        return None, [], {}, None, "zero"
    if isinstance(corrupt, Mean):
        if corrupt.reference is None:
            raise InputError("Mean corruption needs reference= prompts")
        ref = prepare(lm.tokenize(corrupt.reference))
        _, cache = lm.run(ref, cache=sites, last_only=True)
        mask = ref.attention_mask.to(lm.dtype)  # [r, p]
        means = {}
        for s in sites:
            a = cache[s]  # [r, p, ...]
            if ref.shape[1] == batch.shape[1] and bool(ref.attention_mask.all()):
                m = a.mean(0, keepdim=True)
            else:
                w = mask.reshape(*mask.shape, *([1] * (a.dim() - 2)))
                m = (a * w).sum((0, 1)) / mask.sum()
                m = m.expand(1, batch.shape[1], *m.shape)
            means[s] = m.expand(batch.shape[0], *m.shape[1:])
        return None, [], means, None, "mean"
    ivs: list[Intervention] = []
    if isinstance(corrupt, Noise):
        scale = corrupt.scale if corrupt.scale is not None else 3.0 * embedding_std(lm)
        pos = list(range(batch.shape[1])) if corrupt.positions is None else list(corrupt.positions)
        for p in pos:
            if not -batch.shape[1] <= p < batch.shape[1]:
                raise IndexRangeError(
                    f"noise position {p} out of range for {batch.shape[1]} tokens"
                )
        g = torch.Generator().manual_seed(corrupt.seed)
        noise = torch.randn(batch.shape[0], len(pos), lm.cfg.d_model, generator=g) * scale
        ivs = [Intervention("embed", noise.to(lm.device, lm.dtype), op="add", positions=pos)]
        cbatch, name = batch, "noise"
    elif isinstance(corrupt, Resample):
        if corrupt.reference is None:
            raise InputError("Resample corruption needs reference= prompts")
        ref = prepare(lm.tokenize(corrupt.reference))
        g = torch.Generator().manual_seed(corrupt.seed)
        pick = torch.randint(0, ref.shape[0], (batch.shape[0],), generator=g)
        cbatch = ref[pick]
        lm.check_counterfactual(batch, cbatch)
        name = "resample"
    else:
        cbatch = lm.tokenize(corrupt)
        if cbatch.shape[0] == 1 and batch.shape[0] > 1:
            cbatch = cbatch.repeat(batch.shape[0])
        cbatch = prepare(cbatch)
        lm.check_counterfactual(batch, cbatch)
        name = "counterfactual"
    want = list(dict.fromkeys([*sites, *resid_sites]))
    logits, cache = lm.run(cbatch, cache=want, interventions=ivs, last_only=target.next_token)
    return cbatch, ivs, dict(cache), logits, name


def _selection_value(
    u_rows: list[tuple[int, int, PatchUnit]], donor: Tensor, site: str, offset: int = 0
) -> Intervention:
    """One intervention for rows whose units share site and position mode.
    ``offset``: the run starts at this position (a cached prefix precedes it)."""
    rows = torch.tensor([r for r, _, _ in u_rows], dtype=torch.long)
    prompts = torch.tensor([p for _, p, _ in u_rows], dtype=torch.long, device=donor.device)
    all_pos = u_rows[0][2].position is None
    absolute = None if all_pos else [int(u.position or 0) % donor.shape[1] for _, _, u in u_rows]
    pos_t = None if absolute is None else torch.tensor(absolute, device=donor.device)
    pos: list[int] | None = None if absolute is None else [a - offset for a in absolute]
    kind = u_rows[0][2].kind
    idx = [u.index for _, _, u in u_rows]
    has_idx = idx[0] is not None
    if kind == "mlp.neurons" and has_idx:
        nidx = torch.tensor(idx, dtype=torch.long, device=donor.device)
        ar = torch.arange(len(u_rows), device=donor.device)
        if all_pos:
            vals = donor[prompts, :, nidx]  # [n, p]
        else:
            vals = donor[prompts, pos_t, nidx]  # [n]

        def setter(old: Tensor) -> Tensor:
            new = old.clone()
            if all_pos:
                new[ar, :, nidx] = vals.to(old.dtype)
            else:
                new[ar, nidx] = vals.to(old.dtype)
            return new

        return Intervention(site, setter, rows=rows, positions=pos)
    if has_idx:
        h = torch.tensor(idx, dtype=torch.long, device=donor.device)
        vals = donor[prompts, :, h] if all_pos else donor[prompts, pos_t, h]
        return Intervention(site, vals, rows=rows, positions=pos, heads=h)
    vals = donor[prompts] if all_pos else donor[prompts, pos_t]
    return Intervention(site, vals, rows=rows, positions=pos)


PREFIX_GROUPS = 4  # per-position units of a layer are split in this many forwards


def _cropped(cache: Any, keep: int, n_pos: int, repeat: int) -> Any:
    """A copy of ``cache`` holding its first ``keep`` positions, each row repeated."""
    out = copy.deepcopy(cache)
    out.crop(keep - n_pos)  # a negative crop removes that many trailing positions
    if repeat > 1:
        out.batch_repeat_interleave(repeat)
    return out


def _prefix_cache(lm: LM, batch: Batch) -> Any:
    """The base run's key/value cache, or None if this model's cache cannot be
    cropped to a prefix and repeated per row."""
    try:
        with torch.no_grad():
            _, pkv = lm.hf_forward(
                batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=True,
            )
        if pkv is None or not getattr(pkv, "is_croppable", hasattr(pkv, "crop")):
            return None
        trial = _cropped(pkv, 1, batch.shape[1], 2)
        if trial.get_seq_length() != 1:
            return None
        return pkv
    except Exception:  # caches differ between versions and families: fall back
        return None


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
        batch_size: maximum rows (units x prompts) of one forward; None: as many
            as fit ``memory_budget`` (:mod:`attrlab.model.budget`), at most 128.
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
    tokenized counterfactual / reference prompts only."""
    from tqdm.auto import tqdm

    if direction not in ("noising", "denoising"):
        raise InputError(f"direction must be 'noising' or 'denoising', got {direction!r}")
    if batch_size is not None and batch_size < 1:
        raise InputError("batch_size must be >= 1")
    n_prompts, n_pos = batch.shape
    plist = _expand_units(lm, units, n_pos, site)
    if direction == "denoising" and isinstance(corrupt, (Zero, Mean)):
        raise InputError(
            "denoising needs a corrupted run to patch into; zero and mean ablations only "
            "support direction='noising'"
        )
    last_only = tgt.next_token
    sites = sorted({u.site for u in plist})
    layers = sorted({u.layer for u in plist})
    resid_sites = [f"blocks.{layer}.resid_pre" for layer in layers]

    clean_logits, clean_cache = lm.run(batch, cache=[*sites, *resid_sites], last_only=last_only)
    clean_val = tgt(clean_logits, batch).detach().float()
    cbatch, civs, corrupt_cache, corrupt_logits, cname = _donor_acts(
        lm, batch, corrupt, sites, resid_sites, tgt, prepare
    )
    if corrupt_logits is not None and cbatch is not None:
        corrupt_val = tgt(corrupt_logits, cbatch).detach().float()
    else:
        corrupt_val = torch.full_like(clean_val, float("nan"))

    donor_cache: dict[str, Tensor]
    if direction == "noising":
        base_batch, base_cache, donor_cache = batch, dict(clean_cache), corrupt_cache
        if cname == "zero":
            donor_cache = {s: torch.zeros_like(clean_cache[s]) for s in sites}
    else:
        assert cbatch is not None
        base_batch, base_cache, donor_cache = cbatch, corrupt_cache, dict(clean_cache)

    patched = torch.empty(n_prompts, len(plist))
    by_layer: dict[int, list[int]] = {}
    for j, u in enumerate(plist):
        by_layer.setdefault(u.layer, []).append(j)
    batch_size = batch_size_for(
        lm,
        n_pos,
        cap=128,
        batch_size=batch_size,
        memory_budget=memory_budget,
        logit_positions=1 if last_only else None,
    )
    per_fwd = max(1, batch_size // n_prompts)
    prefix = _prefix_cache(lm, base_batch) if reuse_prefix and last_only else None
    chunks = []
    for layer, idx in sorted(by_layer.items()):
        size = per_fwd
        if prefix is not None and all(plist[j].position is not None for j in idx):
            # sorted by position, split in PREFIX_GROUPS chunks: each reuses the
            # cached keys/values of the positions before its first patch
            idx = sorted(idx, key=lambda j: int(plist[j].position or 0) % n_pos)
            size = min(per_fwd, max(1, -(-len(idx) // PREFIX_GROUPS)))
        chunks += [(layer, idx[s : s + size]) for s in range(0, len(idx), size)]
    n_fwd = 0
    with torch.no_grad():
        for layer, cols in tqdm(chunks, disable=not progress, desc="patching"):
            k = len(cols)
            vb = base_batch.repeat(k)  # rows prompt-major: row = i * k + j
            positions = [plist[c].position for c in cols]
            p0 = 0
            if prefix is not None and None not in positions:
                p0 = min(int(p or 0) % n_pos for p in positions)
            groups: dict[tuple[str, bool], list[tuple[int, int, PatchUnit]]] = {}
            for i in range(n_prompts):
                for j, col in enumerate(cols):
                    u = plist[col]
                    groups.setdefault((u.site, u.position is None), []).append((i * k + j, i, u))
            ivs = [
                _selection_value(rows, donor_cache[s], s, offset=p0)
                for (s, _), rows in groups.items()
            ]
            start = base_cache[f"blocks.{layer}.resid_pre"].repeat_interleave(k, 0)
            past = None
            if p0 > 0:
                past = _cropped(prefix, p0, n_pos, k)
                vb_run = Batch(vb.input_ids[:, p0:], vb.attention_mask, vb.position_ids[:, p0:])
                start = start[:, p0:]
            else:
                vb_run = vb
            logits, _ = lm.run(
                vb_run,
                interventions=ivs,
                start_layer=layer,
                start_resid=start,
                last_only=last_only,
                kv_cache=past,
            )
            n_fwd += 1
            vals = tgt(logits, vb).detach().float().reshape(n_prompts, k)
            patched[:, cols] = vals.cpu()
    return PatchSweep(
        units=plist,
        patched=patched,
        clean=clean_val.cpu(),
        corrupt=corrupt_val.cpu(),
        direction=direction,
        n_forwards=n_fwd,
        meta={"corruption": cname, "n_positions": n_pos, "batch": batch},
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


@register("patch", ("heads", "resid", "attn", "mlp", "neurons"))
class ActivationPatching(Method):
    """Exact activation patching (``method="patch"``).

    Options:
        direction: ``"noising"`` (default) or ``"denoising"``.
        corruption: ``None``/``"counterfactual"`` (needs ``counterfactual=``),
            ``"noise"`` (Gaussian noise on ``noise_positions`` embeddings,
            ``noise_scale`` default 3 x embedding std, ``seed``), ``"zero"``,
            ``"mean"`` (over ``reference`` prompts), ``"resample"`` (from
            ``reference``), or a corruption object.
        metric: ``"logit_diff"`` (target on the patched run minus the base run;
            the target may be any logit / logit difference), ``"normalized"``
            ((patched - corrupt) / (clean - corrupt): 1 = clean behaviour,
            0 = corrupt), ``"logprob"`` / ``"prob"`` (change of the target
            token's; single-token targets), ``"kl"`` (KL(clean || patched)).
        site: head activation to patch for ``units="heads"``: ``"z"``, ``"q"``,
            ``"k"``, ``"v"``.
        per_prompt: scores ``[n_prompts, n_units]`` instead of the mean over prompts.
        batch_size: rows per forward (None: as many as fit ``memory_budget``, at
            most 128; see :mod:`attrlab.model.budget`); progress: tqdm bar.

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
        if isinstance(c, (Noise, Zero, Mean, Resample)):
            return c
        if c == "noise":
            return Noise(self.noise_positions, self.noise_scale, self.seed)
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
            per = sw.effects
            mean = per.mean(0)
        scores = per if self.per_prompt else mean
        return Attribution(
            scores,
            units=_labels(lm, sw.units, batch),
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


def _labels(lm: LM, plist: list[PatchUnit], batch: Batch) -> dict[str, list[Any]]:
    """Structured label columns: layer, site, [head | neuron], position, token."""
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
