"""The adapter interface: where one architecture family keeps its modules.

An adapter knows, for one family of Hugging Face causal LMs, which submodule
is the token embedding, the list of blocks, each block's attention, output
projection, MLP, norms, and the unembedding; how its fused projections split
into per-head tensors; which norm formula it uses. Nothing else in attrlab
names a model family. Adding a family = one file in this folder that
subclasses :class:`Adapter` (usually only a few class attributes) + one entry in
the test list of families.

Example:
    >>> from attrlab.model.adapters import adapter_for
    >>> from attrlab.testing import tiny_model
    >>> hf, tok = tiny_model("llama")
    >>> adapter_for(hf).cfg.n_layers
    2
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import transformers
from torch import Tensor, nn

from ...errors import InputError, UnsupportedArchitectureError

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

#: why families whose 4.x attention hides its weights are refused under transformers 4
OLD_ATTENTION_WEIGHTS = (
    "its 4.x attention returns no attention weights to the block, so the pattern "
    "sites the adapter reads are missing"
)

#: why relevance propagation refuses ALiBi checkpoints (MPT, Falcon-RW) under transformers 4.x
OLD_ALIBI_RELEVANCE = (
    "relevance propagation on ALiBi checkpoints needs transformers >= 5 (installed "
    f"{transformers.__version__}): the 4.x implementation adds the position bias to the "
    "attention scores in place, which the relevance rules cannot wrap"
)


def _kv_param_name(model: nn.Module) -> str:
    """``"cache"`` where the model's forward takes it, else ``"past_key_values"``.

    Read off the class, so a forward wrapped on the instance (a profiler, a
    test's counter) does not hide the name."""
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    return "cache" if "cache" in params else "past_key_values"


@dataclass(frozen=True)
class ModelConfig:
    """Shape facts about a wrapped model, read by methods instead of the HF config."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int | None
    parallel_residual: bool
    norm_kind: str  # "layernorm" | "rmsnorm" | "rmsnorm_plus_one"
    post_block_norms: bool  # Gemma 2/3: norms on attn/MLP outputs before the residual add
    final_logit_softcap: float | None
    n_experts: int = 0  # routed experts per mixture-of-experts MLP (0: dense MLPs)
    n_shared_experts: int = 0  # always-on experts beside them (Qwen2-MoE: 1)


def get_path(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path (``"model.layers"``) from ``root``."""
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, nn.Module), path
    return obj


def _offload_hooks(module: nn.Module) -> list[Any]:
    """accelerate's ``AlignDevicesHook`` objects on ``module`` that offload its weights."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = getattr(hook, "hooks", None) or [hook]  # a SequentialHook holds several
    return [h for h in hooks if getattr(h, "offload", False) and h.weights_map is not None]


def param(module: nn.Module, name: str) -> Tensor | None:
    """The tensor ``module.<name>`` (a weight or bias), materialised.

    With accelerate's CPU / disk offload (``device_map`` with ``"cpu"`` or
    ``"disk"``) a module's parameters stay on the ``meta`` device and its hook
    loads them for the module's own forward only; methods that read weights
    directly (DLA, edges, head outputs) get them here, loaded from the hook's
    weights map onto its execution device. Plain models: the attribute itself.

    Raises:
        InputError: the tensor is on the meta device and nothing can load it.

    Example:
        >>> from torch import nn
        >>> param(nn.Linear(2, 3), "weight").shape
        torch.Size([3, 2])
    """
    t = getattr(module, name, None)
    if not isinstance(t, Tensor) or t.device.type != "meta":
        return t
    for hook in _offload_hooks(module):
        try:
            value = hook.weights_map[name]
        except KeyError:
            continue
        dev = hook.execution_device
        return value.to(device=dev if dev is not None else "cpu", dtype=t.dtype)
    raise InputError(_META_MESSAGE.format(what=f"{type(module).__name__}.{name}"))


_META_MESSAGE = (
    "{what} is on the meta device (no weights): materialise the model before wrapping it, "
    "e.g. load it with al.load(path) / from_pretrained, or model.to_empty(device='cpu') "
    "followed by model.load_state_dict(...); accelerate's offload (device_map with "
    "'cpu' / 'disk') is supported"
)


def unmaterialisable(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters and buffers on the meta device that no
    accelerate offload hook can load (empty for usable models).

    Example:
        >>> from torch import nn
        >>> unmaterialisable(nn.Linear(2, 3)), unmaterialisable(nn.Linear(2, 3, device="meta"))
        ([], ['weight', 'bias'])
    """
    bad = []
    for mod_name, mod in model.named_modules():
        tensors = [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
        meta = [n for n, t in tensors if t.device.type == "meta"]
        if not meta:
            continue
        hooks = _offload_hooks(mod)
        for n in meta:
            if not any(_has_key(h.weights_map, n) for h in hooks):
                bad.append(f"{mod_name}.{n}" if mod_name else n)
    return bad


def _has_key(weights_map: Any, name: str) -> bool:
    try:
        weights_map[name]
    except KeyError:
        return False
    return True


def linear_in_out(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Weight as ``[d_in, d_out]`` and bias ``[d_out]`` of a linear map
    (materialised if accelerate offloads it, see :func:`param`).

    Handles ``nn.Linear`` (weight stored ``[out, in]``) and GPT-2's ``Conv1D``
    (weight stored ``[in, out]``).
    """
    weight = param(module, "weight")
    assert weight is not None
    if isinstance(module, nn.Linear):
        return weight.T, param(module, "bias")
    # transformers.pytorch_utils.Conv1D: y = x @ W + b with W [in, out]
    return weight, param(module, "bias")


def linear_layout(module: nn.Module) -> bool | None:
    """How a plain linear layer stores its weight: ``False`` for ``nn.Linear``
    (``y = x @ W.T + b``), ``True`` for GPT-2's ``Conv1D`` (``y = x @ W + b``),
    ``None`` for anything else (not a plain linear map).

    Example:
        >>> from torch import nn
        >>> linear_layout(nn.Linear(2, 3)), linear_layout(nn.ReLU())
        (False, None)
    """
    if type(module) is nn.Linear:
        return False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return True if type(module) is Conv1D else None


def _is_norm(m: nn.Module) -> bool:
    """A normalisation module: ``nn.LayerNorm`` / ``nn.RMSNorm`` or a Hugging Face
    ``*RMSNorm`` / ``*LayerNorm`` class."""
    if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True
    name = type(m).__name__
    return name.endswith(("RMSNorm", "LayerNorm"))


class Adapter:
    """Per-family knowledge. Subclasses set the class attributes below.

    Paths are dotted attribute names, model-level ones from the HF causal-LM
    model, block-level ones from one block.
    """

    family: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()

    embed_path: ClassVar[str] = "model.embed_tokens"
    blocks_path: ClassVar[str] = "model.layers"
    final_norm_path: ClassVar[str] = "model.norm"
    unembed_path: ClassVar[str] = "lm_head"

    attn_name: ClassVar[str] = "self_attn"
    o_proj_name: ClassVar[str] = "self_attn.o_proj"
    q_name: ClassVar[str | None] = "self_attn.q_proj"
    k_name: ClassVar[str | None] = "self_attn.k_proj"
    v_name: ClassVar[str | None] = "self_attn.v_proj"
    qkv_name: ClassVar[str | None] = None  # fused projection, if any
    mlp_name: ClassVar[str] = "mlp"
    down_proj_name: ClassVar[str] = "mlp.down_proj"
    attn_in_norm_name: ClassVar[str] = "input_layernorm"
    mlp_in_norm_name: ClassVar[str] = "post_attention_layernorm"
    attn_out_norm_name: ClassVar[str | None] = None
    mlp_out_norm_name: ClassVar[str | None] = None
    norm_kind: ClassVar[str] = "rmsnorm"
    #: attention scores are exactly ``attn.scaling * q . k`` of the ``attn.q`` /
    #: ``attn.k`` sites (no rotary or other position terms), so methods may
    #: recompute them (AtP*'s QK fix)
    plain_qk_scores: ClassVar[bool] = False
    #: model-level rotary embedding module (``forward(x, position_ids)`` ->
    #: ``(cos, sin)`` ``[batch, pos, d_head]``), set where the scores are exactly
    #: ``attn.scaling * rope(q) . rope(k)`` of the ``attn.q`` / ``attn.k`` sites
    #: with a half-split rotation of the whole head (Llama, Mistral, Qwen2, Gemma 1, Phi-3)
    rotary_path: ClassVar[str | None] = None
    #: model-level learned position embedding added to the token embeddings, if any
    pos_embed_path: ClassVar[str | None] = None
    #: why this family's attention scores are not a function of the ``attn.q`` /
    #: ``attn.k`` sites that :meth:`scores_qk` can compute (q/k norms, ALiBi, ...);
    #: set: :meth:`qk_scores_exact` is False and :meth:`scores_qk` refuses
    qk_scores_refusal: ClassVar[str | None] = None
    #: constant factors the model applies outside the named modules (Granite,
    #: Cohere): on the token embedding module's output, on attention's and the
    #: MLP's outputs before the residual add, and on the unembedding's output.
    #: The sites ``embed``, ``attn.out`` / ``attn.head_out``, ``mlp.out`` and
    #: ``unembed`` hold the scaled values (what the residual stream / the logits
    #: really receive), and ``W_O`` / ``b_O`` / ``W_out`` / ``b_out`` / ``W_U`` /
    #: ``b_U`` include the factor, so every decomposition sums exactly.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logit_multiplier: float = 1.0
    #: the oldest transformers major version whose implementation of the family
    #: the adapter is tested against (older ones: a typed refusal at wrap time,
    #: with :attr:`old_transformers_reason`)
    min_transformers_major: ClassVar[int] = 0
    old_transformers_reason: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        self.model: Any = model
        self.hf_config: Any = model.config
        if TRANSFORMERS_MAJOR < self.min_transformers_major:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} needs transformers >= {self.min_transformers_major} "
                f"here (installed {transformers.__version__}): {self.old_transformers_reason}; "
                "pip install -U transformers"
            )
        self.cfg = self._make_config()

    def mlp_shares_attn_norm(self, layer: int) -> bool:
        """Whether the MLP reads the output of the pre-attention norm itself
        (parallel blocks with one norm: Cohere, parallel StableLM). The
        ``mlp.in`` site is then recomputed through that norm for the MLP alone,
        so writing it never changes what attention reads."""
        return self.mlp_in_norm(layer) is self.attn_in_norm(layer)

    # --------------------------------------------------------- key/value cache
    def kv_kwargs(self, kv_cache: Any, use_cache: bool) -> dict[str, Any]:
        """Keyword arguments that hand ``kv_cache`` (a Hugging Face cache of a
        shared prefix, or None) to the model's forward.

        transformers 5.25 renamed the forward's ``past_key_values`` to ``cache``
        (the old name warns, and goes in 5.40); this is the one place that knows
        which name the installed version takes. A None cache is not passed at
        all, so neither name is ever sent needlessly.

        Example:
            >>> from attrlab.model.adapters import adapter_for
            >>> from attrlab.testing import tiny_model
            >>> adapter_for(tiny_model("gpt2")[0]).kv_kwargs(None, False)
            {'use_cache': False}
        """
        kw: dict[str, Any] = {"use_cache": use_cache}
        if kv_cache is not None:
            kw[_kv_param_name(self.model)] = kv_cache
        return kw

    @staticmethod
    def kv_returned(out: Any) -> Any:
        """The key/value cache a forward returned (``out.cache`` on transformers
        that renamed it, ``out.past_key_values`` before), or None."""
        if "cache" in getattr(out, "__dataclass_fields__", {}):
            return out.cache
        return getattr(out, "past_key_values", None)

    # ----------------------------------------------------------------- config
    def _make_config(self) -> ModelConfig:
        c = self.hf_config
        n_heads = c.num_attention_heads
        d_model = c.hidden_size
        d_head = getattr(c, "head_dim", None) or d_model // n_heads
        return ModelConfig(
            family=self.family,
            n_layers=c.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads,
            d_model=d_model,
            d_head=d_head,
            d_mlp=self._d_mlp(),
            d_vocab=c.vocab_size,
            n_ctx=self._n_ctx(),
            parallel_residual=self.parallel_residual(),
            norm_kind=self.norm_kind,
            post_block_norms=self.attn_out_norm_name is not None,
            final_logit_softcap=getattr(c, "final_logit_softcapping", None),
        )

    def _d_mlp(self) -> int:
        """The MLP's hidden width: ``intermediate_size``, GPT-style ``n_inner``, or 4 x d_model."""
        c = self.hf_config
        d = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None)
        return int(d or 4 * c.hidden_size)

    def _n_ctx(self) -> int | None:
        """The learned or rotary context length, if the config has one."""
        return getattr(self.hf_config, "max_position_embeddings", None)

    def parallel_residual(self) -> bool:
        return False

    # --------------------------------------------------------------- modules
    def token_embedding(self) -> nn.Module:
        return get_path(self.model, self.embed_path)

    def input_device(self) -> torch.device:
        """Where input ids go: the token embedding's device (its execution
        device when accelerate offloads it to the CPU or disk)."""
        emb = self.token_embedding()
        weight: Tensor = emb.weight  # type: ignore[assignment]
        if weight.device.type == "meta":
            for hook in _offload_hooks(emb):
                if hook.execution_device is not None:
                    return torch.device(hook.execution_device)
        return weight.device

    def block_returns_tuple(self) -> bool:
        """Whether a decoder block returns ``(hidden, ...)`` rather than ``hidden``.

        This differs between families and ``transformers`` versions (GPT-2 blocks
        return a tuple before transformers 5, Llama blocks already return a
        tensor in 4.5x), so it is observed once with a one-token forward and
        cached. Needed when a block is replaced by a pass-through (runs that
        start at a later layer).
        """
        cached = self.__dict__.get("_block_returns_tuple")
        if cached is None:
            seen: list[bool] = []
            handle = self.block(0).register_forward_hook(
                lambda _m, _a, out: seen.append(isinstance(out, tuple))
            )
            try:
                dev = self.input_device()
                with torch.no_grad():
                    one = torch.ones(1, 1, dtype=torch.long, device=dev)
                    self.model(input_ids=one, attention_mask=one)
            finally:
                handle.remove()
            cached = self.__dict__["_block_returns_tuple"] = bool(seen and seen[0])
        return cached

    def qk_scores_exact(self, n_pos: int) -> bool:
        """Whether :meth:`scores_qk` reproduces the attention scores of an
        ``n_pos``-token causal run (no softcapping, partial rotary, or sliding
        window shorter than the run)."""
        if self.qk_scores_refusal is not None:
            return False
        if self.plain_qk_scores:
            return True
        if self.rotary_path is None:
            return False
        c = self.hf_config
        if getattr(c, "attn_logit_softcapping", None) is not None:
            return False
        window = getattr(c, "sliding_window", None)
        if window is not None and getattr(c, "use_sliding_window", True) and n_pos > window:
            return False
        return getattr(c, "partial_rotary_factor", 1.0) in (None, 1.0)

    def attn_scale(self, layer: int) -> float:
        """The factor on ``q . k`` in layer ``layer``'s attention scores.

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("llama"))
            >>> lm.adapter.attn_scale(0) == lm.cfg.d_head**-0.5
            True
        """
        s = getattr(self.attn(layer), "scaling", None)
        return float(s) if s is not None else float(self.cfg.d_head) ** -0.5

    def scores_qk(self, q: Tensor, k: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys whose scaled dot product is the attention score.

        ``q`` ``[batch, pos, head, d_head]`` and ``k`` ``[batch, pos, kv_head,
        d_head]`` are the ``attn.q`` / ``attn.k`` sites; the result applies the
        family's rotary embedding at ``position_ids`` ``[batch, pos]`` (none for
        plain q.k families) and repeats each key head for the query heads that
        share it, so ``scores = attn_scale(l) * einsum("bqhd,bkhd->bhqk", q', k')``.
        Check :meth:`qk_scores_exact` first.

        Example:
            >>> import torch, attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("llama"))
            >>> q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8)
            >>> q2, k2 = lm.adapter.scores_qk(q, k, torch.arange(3)[None])
            >>> tuple(k2.shape)
            (1, 3, 4, 8)

        Raises:
            UnsupportedArchitectureError: the family's scores are not a function
                of these sites (:attr:`qk_scores_refusal` says why).
        """
        if self.qk_scores_refusal is not None:
            raise UnsupportedArchitectureError(
                f"scores_qk is not available for family {self.family!r}: {self.qk_scores_refusal}"
            )
        if self.rotary_path is not None and not self.plain_qk_scores:
            cos, sin = get_path(self.model, self.rotary_path)(q, position_ids)
            cos = cos[:, :, None, :].to(q.device, q.dtype)
            sin = sin[:, :, None, :].to(q.device, q.dtype)

            def rope(x: Tensor) -> Tensor:
                x1, x2 = x.chunk(2, dim=-1)
                return x * cos + torch.cat((-x2, x1), dim=-1) * sin

            q, k = rope(q), rope(k)
        n_rep = q.shape[2] // k.shape[2]
        return q, (k.repeat_interleave(n_rep, dim=2) if n_rep > 1 else k)

    def blocks(self) -> nn.ModuleList:
        mods = get_path(self.model, self.blocks_path)
        assert isinstance(mods, nn.ModuleList)
        return mods

    def block(self, layer: int) -> nn.Module:
        return self.blocks()[layer]

    def final_norm(self) -> nn.Module:
        return get_path(self.model, self.final_norm_path)

    def unembed(self) -> nn.Module:
        return get_path(self.model, self.unembed_path)

    def relevance_roles(self) -> dict[str, list[nn.Module]]:
        """Where relevance rules act (:mod:`attrlab.lrp`): ``norm`` (every
        normalisation module, also the ones inside attention, such as Qwen 3's
        q/k norms), ``attention`` and ``mlp`` (the blocks' modules, whose
        matmuls / gated products get the uniform rule), ``linear`` (plain linear
        layers), ``position`` (a learned position embedding: its share is
        reported like a bias's), ``first_block`` and ``unembed``; an adapter may
        add ``activation``: elementwise activation modules of types the rules do
        not know (BLOOM's custom-autograd GELU)."""
        model = self.model
        named = {id(self.final_norm())}
        for layer in range(self.cfg.n_layers):
            for m in (self.attn_in_norm(layer), self.mlp_in_norm(layer),
                      self.attn_out_norm(layer), self.mlp_out_norm(layer)):  # fmt: skip
                if m is not None:
                    named.add(id(m))
        norms = [m for m in model.modules() if id(m) in named or _is_norm(m)]
        layers = range(self.cfg.n_layers)
        return {
            "norm": norms,
            "attention": [self.attn(layer) for layer in layers],
            "mlp": [self.mlp(layer) for layer in layers],
            "linear": [m for m in model.modules() if linear_layout(m) is not None],
            "position": [get_path(model, self.pos_embed_path)] if self.pos_embed_path else [],
            "first_block": [self.block(0)],
            "unembed": [self.unembed()],
        }

    def sub(self, layer: int, name: str | None) -> nn.Module | None:
        return None if name is None else get_path(self.block(layer), name)

    def attn(self, layer: int) -> nn.Module:
        return get_path(self.block(layer), self.attn_name)

    def o_proj(self, layer: int) -> nn.Module:
        return get_path(self.block(layer), self.o_proj_name)

    def attn_out_module(self, layer: int) -> nn.Module:
        """The module whose output is attention's contribution to the residual
        (the ``attn.out`` site, unless a post-attention norm follows): the
        attention module, or its output projection where the attention module
        adds the residual itself (BLOOM)."""
        return self.attn(layer)

    def mlp(self, layer: int) -> nn.Module:
        return get_path(self.block(layer), self.mlp_name)

    def mlp_passthrough(self, layer: int) -> Callable[..., Any] | None:
        """A forward for the MLP module that computes nothing and returns its
        input in the MLP's output format, for runs that replace the MLP's output
        anyway (transcoders); None: the MLP has to run. A dense MLP returns a
        tensor shaped like its input; an adapter whose MLP returns more (a
        mixture of experts' router logits) overrides this."""
        return lambda x, *args, **kwargs: x

    # ------------------------------------------------------ mixture of experts
    def experts(self, layer: int) -> nn.Module | None:
        """The fused experts module of layer ``layer``'s mixture-of-experts MLP
        (None: a dense MLP; see :mod:`.moe`)."""
        return None

    def router(self, layer: int) -> nn.Module | None:
        """The top-k router of layer ``layer``'s mixture-of-experts MLP (None: dense)."""
        return None

    def shared_expert(self, layer: int) -> tuple[nn.Module, nn.Module | None] | None:
        """``(shared expert, its gate or None)`` of an MoE MLP that has one."""
        return None

    def route(self, layer: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Router logits -> ``(weights, index)`` (MoE families only)."""
        raise UnsupportedArchitectureError(f"family {self.family!r} has no experts")

    def expert_outputs(self, layer: int, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """Each expert's weighted output ``[tokens, n_experts, d_model]`` (MoE only)."""
        raise UnsupportedArchitectureError(f"family {self.family!r} has no experts")

    def shared_output(self, layer: int, out: Tensor, gate: Tensor | None) -> Tensor:
        """The shared expert's contribution from its output and gate logit (MoE only)."""
        raise UnsupportedArchitectureError(f"family {self.family!r} has no shared expert")

    def down_proj(self, layer: int) -> nn.Module:
        return get_path(self.block(layer), self.down_proj_name)

    def attn_in_norm(self, layer: int) -> nn.Module:
        """The norm attention reads the residual stream through (``ln_1``, ``input_layernorm``)."""
        return get_path(self.block(layer), self.attn_in_norm_name)

    def mlp_in_norm(self, layer: int) -> nn.Module:
        return get_path(self.block(layer), self.mlp_in_norm_name)

    def attn_out_norm(self, layer: int) -> nn.Module | None:
        return self.sub(layer, self.attn_out_norm_name)

    def mlp_out_norm(self, layer: int) -> nn.Module | None:
        return self.sub(layer, self.mlp_out_norm_name)

    # ------------------------------------------------------------- q, k, v
    def qkv_modules(self, layer: int) -> dict[str, nn.Module]:
        """``{"q":, "k":, "v":}`` for separate projections or ``{"qkv":}`` if fused."""
        if self.qkv_name is not None:
            return {"qkv": get_path(self.block(layer), self.qkv_name)}
        names = {"q": self.q_name, "k": self.k_name, "v": self.v_name}
        return {k: get_path(self.block(layer), n) for k, n in names.items() if n}

    def split_qkv(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Fused projection output ``[b, p, *]`` -> q ``[b,p,h,dh]``, k, v ``[b,p,kv,dh]``."""
        c = self.cfg
        q, k, v = out.split(
            [c.n_heads * c.d_head, c.n_kv_heads * c.d_head, c.n_kv_heads * c.d_head], dim=-1
        )
        return (
            q.unflatten(-1, (c.n_heads, c.d_head)),
            k.unflatten(-1, (c.n_kv_heads, c.d_head)),
            v.unflatten(-1, (c.n_kv_heads, c.d_head)),
        )

    def merge_qkv(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Inverse of :meth:`split_qkv`."""
        return torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)

    def qkv_weights(self, layer: int) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Per-head input projections of layer ``layer``'s attention:
        ``{"q" | "k" | "v": (W [d_model, heads, d_head], b [heads, d_head] or None)}``
        (query heads for q, key/value heads for k and v), so that head ``h``'s query
        is ``attn_in_norm(x) @ W[:, h] + b[h]`` (before any rotary embedding or
        q/k norm). Fused projections are split with :meth:`split_qkv`, the one
        place that knows the family's column layout.

        Example:
            >>> import attrlab as al
            >>> lm = al.wrap(*al.testing.tiny_model("gpt_neox"))
            >>> W, b = lm.adapter.qkv_weights(0)["k"]
            >>> tuple(W.shape), tuple(b.shape)
            ((32, 4, 8), (4, 8))
        """
        out: dict[str, tuple[Tensor, Tensor | None]] = {}
        for key, mod in self.qkv_modules(layer).items():
            w, b = linear_in_out(mod)  # [d_in, d_out], [d_out]
            if key == "qkv":  # the input dimension plays the position axis of split_qkv
                ws = self.split_qkv(w[None])  # ([1, d_in, heads, d_head], ...)
                bs = self.split_qkv(b[None, None]) if b is not None else (None, None, None)
                for c, wc, bc in zip("qkv", ws, bs):
                    out[c] = (wc[0], None if bc is None else bc[0, 0])
            else:
                dh = self.cfg.d_head
                out[key] = (
                    w.unflatten(-1, (-1, dh)),
                    None if b is None else b.unflatten(-1, (-1, dh)),
                )
        return out

    # --------------------------------------------------------------- weights
    @staticmethod
    def _times(t: Tensor | None, factor: float) -> Tensor | None:
        return t if t is None or factor == 1.0 else t * factor

    def W_O(self, layer: int) -> Tensor:
        """Attention output projection per head, ``[head, d_head, d_model]``
        (times the residual multiplier, if the family has one)."""
        w0, _ = linear_in_out(self.o_proj(layer))
        w = self._times(w0, self.residual_multiplier)
        assert w is not None
        return w.reshape(self.cfg.n_heads, self.cfg.d_head, w.shape[-1])

    def b_O(self, layer: int) -> Tensor | None:
        return self._times(linear_in_out(self.o_proj(layer))[1], self.residual_multiplier)

    def W_out(self, layer: int) -> Tensor:
        """MLP output projection, ``[d_mlp, d_model]`` (times the residual multiplier)."""
        w = self._times(linear_in_out(self.down_proj(layer))[0], self.residual_multiplier)
        assert w is not None
        return w

    def b_out(self, layer: int) -> Tensor | None:
        return self._times(linear_in_out(self.down_proj(layer))[1], self.residual_multiplier)

    def W_U(self) -> Tensor:
        """Unembedding, ``[d_model, d_vocab]`` (times the logit multiplier)."""
        w = self._times(linear_in_out(self.unembed())[0], self.logit_multiplier)
        assert w is not None
        return w

    def b_U(self) -> Tensor | None:
        return self._times(linear_in_out(self.unembed())[1], self.logit_multiplier)

    # ----------------------------------------------------------------- norms
    @staticmethod
    def norm_eps(norm: nn.Module) -> float:
        for name in ("variance_epsilon", "eps", "epsilon"):
            if hasattr(norm, name):
                return float(getattr(norm, name))
        raise AttributeError(f"cannot find the epsilon of {type(norm).__name__}")

    def norm_scale(self, norm: nn.Module, x: Tensor) -> Tensor:
        """The reciprocal scale ``1/std`` the norm applies to ``x``, ``[..., 1]``."""
        xf = x.float()
        eps = self.norm_eps(norm)
        if self.norm_kind == "layernorm":
            var = xf.var(-1, keepdim=True, unbiased=False)
        else:
            var = xf.pow(2).mean(-1, keepdim=True)
        return torch.rsqrt(var + eps).to(x.dtype)

    def norm_affine(self, norm: nn.Module) -> tuple[Tensor, Tensor | None]:
        """The effective elementwise weight and bias of a norm (``1 + w`` for Gemma)."""
        w = param(norm, "weight")
        assert w is not None
        if self.norm_kind == "rmsnorm_plus_one":
            w = 1.0 + w
        return w, param(norm, "bias")

    def norm_linearized(self, norm: nn.Module, x: Tensor, scale: Tensor) -> Tensor:
        """``norm(x)`` with its scale frozen to ``scale``: linear in ``x`` (affine with bias).

        With ``scale = norm_scale(norm, x)`` this equals ``norm(x)`` up to rounding.
        Computed in float32, or float64 for float64 ``x``.
        """
        w, b = self.norm_affine(norm)
        if self.norm_kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        ct = torch.promote_types(x.dtype, torch.float32)
        # the norm's weights may be on another device than x (device_map)
        y = (x.to(ct) * scale.to(x.device, ct) * w.to(x.device, ct)).to(x.dtype)
        return y if b is None else y + b.to(y.device, y.dtype)
