"""Loading and saving dictionaries: the SAELens layout (``cfg.json`` +
``sae_weights.safetensors``) and circuit-tracer's transcoder layout
(``config.yaml`` + ``layer_{l}.safetensors``). Local files only.

Hook names of TransformerLens (what SAELens and circuit-tracer record) are
mapped to attrlab sites: ``blocks.{l}.hook_resid_pre|mid|post`` ->
``blocks.{l}.resid_pre|mid|post``, ``hook_mlp_out`` -> ``mlp.out``,
``hook_attn_out`` / ``mlp.hook_out`` -> ``mlp.out``, ``hook_mlp_in`` ->
``mlp.in`` (the residual the MLP's norm reads), ``ln2.hook_normalized`` and
circuit-tracer's ``mlp.hook_in`` -> ``mlp.normed`` (the MLP's own input, after
its norm). Sites attrlab does not expose (``attn.hook_z``) raise a typed error.

Example:
    >>> import tempfile
    >>> d = Dictionary.random(8, 16, "blocks.0.resid_pre", seed=1)
    >>> p = save_saelens(d, tempfile.mkdtemp())
    >>> back = load(p)
    >>> back.in_site, bool(torch.equal(back.W_enc, d.W_enc))
    ('blocks.0.resid_pre', True)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._files import write_atomically
from ..errors import FileFormatError, InputError
from .base import Dictionary

__all__ = [
    "load",
    "load_saelens",
    "load_circuit_tracer",
    "save_saelens",
    "save_saelens_set",
    "site_of_hook",
]

_HOOKS = {
    "hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
    "hook_mlp_out": "mlp.out", "hook_attn_out": "attn.out", "hook_mlp_in": "mlp.in",
    "mlp.hook_in": "mlp.normed", "ln2.hook_normalized": "mlp.normed", "mlp.hook_out": "mlp.out",
}  # fmt: skip
_NATIVE = ("resid_pre", "resid_mid", "resid_post", "mlp.in", "mlp.normed", "mlp.out", "attn.out")


def site_of_hook(hook: str, layer: int | None = None) -> str:
    """The attrlab site of a TransformerLens hook name (or an attrlab site, unchanged).

    Example:
        >>> site_of_hook("blocks.3.hook_resid_pre"), site_of_hook("hook_mlp_out", 2)
        ('blocks.3.resid_pre', 'blocks.2.mlp.out')
    """
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    rest = hook
    if m:
        layer, rest = int(m.group(1)), m.group(2)
    if rest in _HOOKS:
        rest = _HOOKS[rest]
    elif rest not in _NATIVE:
        raise InputError(
            f"hook {hook!r} is not an attrlab site; dictionaries can read resid_pre/mid/post, "
            "mlp.in (before the MLP's norm), mlp.normed (after it), mlp.out and attn.out"
        )
    if layer is None:
        raise InputError(f"hook {hook!r} names no layer")
    return f"blocks.{layer}.{rest}"


def _hook_of_site(site: str) -> str:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", site)
    inv = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
           "mlp.out": "hook_mlp_out", "attn.out": "hook_attn_out", "mlp.in": "hook_mlp_in",
           "mlp.normed": "ln2.hook_normalized"}  # fmt: skip
    if m and m.group(2) in inv:
        return f"blocks.{m.group(1)}.{inv[m.group(2)]}"
    return site


def _read(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for bad files
        raise FileFormatError(f"cannot read the {what} {path}: {e}") from e


def load_saelens(path: str | Path) -> Dictionary:
    """A dictionary from a SAELens directory (``cfg.json``, ``sae_weights.safetensors``):
    architectures ``standard`` (ReLU), ``jumprelu``, ``topk``; transcoders with
    ``hook_name_out`` / ``d_out`` (and ``W_skip``).

    Raises:
        FileFormatError: missing or malformed files; InputError: unsupported
            architecture or hook.
    """
    p = Path(path)
    try:
        cfg = json.loads((p / "cfg.json").read_text())
    except (OSError, ValueError) as e:
        raise FileFormatError(f"{p}: no readable cfg.json ({e})") from e
    t = _read(p / "sae_weights.safetensors", "SAELens weights")
    arch = str(cfg.get("architecture", "standard"))
    act_name = str(cfg.get("activation_fn_str", cfg.get("activation_fn", "relu")))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if arch == "jumprelu":
        activation = "jumprelu"
    elif arch == "topk" or act_name == "topk":
        activation = "topk"
    elif arch == "standard" and act_name == "relu":
        activation = "relu"
    else:
        raise InputError(
            f"{p}: SAELens architecture {arch!r} / activation {act_name!r} is not supported"
        )
    hook = cfg.get("attrlab_in_site") or cfg.get("hook_name") or cfg.get("hook_point")
    if not hook:
        raise FileFormatError(f"{p}: cfg.json names no hook (hook_name)")
    layer = cfg.get("hook_layer", cfg.get("hook_point_layer"))
    in_site = site_of_hook(str(hook), layer)
    out_hook = cfg.get("attrlab_out_site") or cfg.get("hook_name_out")
    out_site = site_of_hook(str(out_hook), layer) if out_hook else in_site
    threshold = t.get("threshold")
    if threshold is None and "log_threshold" in t:
        threshold = t["log_threshold"].exp()
    try:
        d = Dictionary(
            W_enc=t["W_enc"], b_enc=t["b_enc"], W_dec=t["W_dec"], b_dec=t["b_dec"],
            in_site=in_site, out_site=out_site, activation=activation, threshold=threshold,
            k=int(kwargs.get("k", cfg.get("k", 0))) or None,
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
            W_skip=t.get("W_skip"), meta={"source": str(p), "format": "saelens"},
        )  # fmt: skip
    except KeyError as e:
        raise FileFormatError(f"{p}: sae_weights.safetensors lacks {e}") from e
    if cfg.get("normalize_activations") not in (None, "none", False):
        raise InputError(
            f"{p}: normalize_activations={cfg['normalize_activations']!r} is not supported"
        )
    if (
        "d_sae" in cfg
        and int(cfg["d_sae"]) != d.width
        or "d_in" in cfg
        and int(cfg["d_in"]) != d.d_in
    ):
        raise FileFormatError(f"{p}: cfg.json's d_in / d_sae do not match the weights")
    return d


def save_saelens(d: Dictionary, path: str | Path) -> Path:
    """Write ``d`` in the SAELens layout (atomically); attrlab's own site names
    are kept in ``attrlab_in_site`` / ``attrlab_out_site``.

    Example:
        >>> import tempfile
        >>> p = save_saelens(Dictionary.random(4, 8, "blocks.1.mlp.in", "blocks.1.mlp.out"),
        ...                  tempfile.mkdtemp())
        >>> load(p).kind
        'transcoder'
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[d.activation]
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": d.d_in, "d_sae": d.width, "d_out": d.d_out,
        "hook_name": _hook_of_site(d.in_site), "apply_b_dec_to_input": d.apply_b_dec_to_input,
        "activation_fn_str": "topk" if d.activation == "topk" else "relu",
        "activation_fn_kwargs": {"k": d.k} if d.k else {}, "normalize_activations": "none",
        "attrlab_in_site": d.in_site, "attrlab_out_site": d.out_site, "attrlab_meta": d.meta,
    }  # fmt: skip
    if d.kind == "transcoder":
        cfg["hook_name_out"] = _hook_of_site(d.out_site)
    tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    if d.threshold is not None:
        tensors["threshold"] = d.threshold
    if d.W_skip is not None:
        tensors["W_skip"] = d.W_skip
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(p / "sae_weights.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    text = json.dumps(cfg, indent=1, default=str)
    write_atomically(p / "cfg.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return p


def load_circuit_tracer(path: str | Path) -> list[Dictionary]:
    """Per-layer transcoders from circuit-tracer's layout: ``config.yaml``
    (``feature_input_hook``, ``feature_output_hook``) and ``layer_{l}.safetensors``
    (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, optional ``threshold`` for
    JumpReLU and ``W_skip``). ``W_enc`` stored ``[width, d]`` is transposed.

    Raises:
        FileFormatError: no config or no layer files.
    """
    import yaml

    p = Path(path)
    try:
        cfg = yaml.safe_load((p / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise FileFormatError(f"{p}: no readable config.yaml ({e})") from e
    files = sorted(p.glob("layer_*.safetensors"), key=lambda f: int(f.stem.split("_")[1]))
    if not files:
        raise FileFormatError(f"{p}: no layer_{{l}}.safetensors files")
    in_hook = str(cfg.get("feature_input_hook", "hook_resid_mid"))
    out_hook = str(cfg.get("feature_output_hook", "hook_mlp_out"))
    out = []
    for f in files:
        layer = int(f.stem.split("_")[1])
        t = _read(f, "transcoder")
        try:
            W_enc, b_enc, W_dec = t["W_enc"], t["b_enc"], t["W_dec"]
        except KeyError as e:
            raise FileFormatError(f"{f} lacks {e}") from e
        if W_enc.shape[0] == b_enc.shape[0] and W_enc.shape[1] != b_enc.shape[0]:
            W_enc = W_enc.T  # stored [width, d]
        if W_dec.shape[0] != b_enc.shape[0]:
            W_dec = W_dec.T
        # circuit-tracer writes a JumpReLU threshold as ``activation_function.threshold``
        threshold = t.get("threshold", t.get("activation_function.threshold"))
        out.append(Dictionary(
            W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=t.get("b_dec", torch.zeros(W_dec.shape[1])),
            in_site=site_of_hook(in_hook, layer), out_site=site_of_hook(out_hook, layer),
            activation="jumprelu" if threshold is not None else "relu", threshold=threshold,
            W_skip=t.get("W_skip"), meta={"source": str(f), "format": "circuit-tracer"},
        ))  # fmt: skip
    return out


def _layer_of(site: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", site)
    return int(m.group(1)) if m else None


def save_saelens_set(
    ds: list[Dictionary], path: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """Write a per-layer set (transcoders, SAEs) as one SAELens folder per
    dictionary, ``path/layer_{l}/`` (``l`` the layer of its input site), in
    ``dtype`` (None: as they are). :func:`load` reads the folder back as a list.

    Raises:
        InputError: empty set, or two dictionaries on the same layer.

    Example:
        >>> import tempfile
        >>> ds = [Dictionary.random(4, 8, f"blocks.{l}.mlp.in", f"blocks.{l}.mlp.out") for l in (0, 1)]
        >>> p = save_saelens_set(ds, tempfile.mkdtemp(), dtype=torch.float16)
        >>> back = load(p)
        >>> [d.in_site for d in back], back[0].W_enc.dtype
        (['blocks.0.mlp.in', 'blocks.1.mlp.in'], torch.float16)
    """
    layers = [_layer_of(d.in_site) for d in ds]
    if not ds:
        raise InputError("no dictionaries to save")
    names = [f"layer_{la}" if la is not None else f"dict_{i}" for i, la in enumerate(layers)]
    if len(set(names)) != len(names):
        raise InputError("two dictionaries read the same layer; save them to separate folders")
    p = Path(path)
    for d, name in zip(ds, names):
        save_saelens(d.to(dtype) if dtype is not None else d, p / name)
    return p


def _load_saelens_set(p: Path) -> list[Dictionary]:
    def order(f: Path) -> tuple[int, str]:
        tail = f.name.split("_")[-1]
        return (int(tail) if tail.isdigit() else 1 << 30, f.name)

    folders = sorted((f.parent for f in p.glob("*/cfg.json")), key=order)
    return [load_saelens(f) for f in folders]


def load(path: str | Path) -> Any:
    """A SAELens directory (one :class:`Dictionary`), a circuit-tracer
    directory (a list, one per layer), or a folder of SAELens directories
    (``layer_{l}/``, as :func:`save_saelens_set` and ``attrlab transcoders``
    write them; a list in layer order), whichever ``path`` holds.

    Raises:
        FileFormatError: none of these layouts.
    """
    p = Path(path)
    if (p / "cfg.json").exists():
        return load_saelens(p)
    if (p / "config.yaml").exists():
        return load_circuit_tracer(p)
    if p.is_dir() and any(p.glob("*/cfg.json")):
        return _load_saelens_set(p)
    raise FileFormatError(f"{p} holds neither a SAELens dictionary (cfg.json), a folder of "
                          "them (layer_*/cfg.json), nor circuit-tracer transcoders "
                          "(config.yaml)")  # fmt: skip
