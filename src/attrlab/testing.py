"""Tiny random-weight models of real architectures, built offline.

Tests, benchmarks, examples and the demo use these so that nothing is ever
downloaded. The tokenizer is a byte-level BPE trained in milliseconds on a
small built-in text, so any string tokenizes (no unknown tokens).

Example:
    >>> from attrlab.testing import tiny_model, FAMILIES
    >>> hf, tok = tiny_model("gpt2")
    >>> hf.config.n_layer
    2
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

_CORPUS = """
When Mary and John went to the store, John gave a drink to Mary.
When Tom and Anna went to the park, Anna gave a ball to Tom.
The capital of France is Paris. The capital of Italy is Rome.
Alice and Bob talked about the weather. It was sunny and warm.
The quick brown fox jumps over the lazy dog. A cat sat on the mat.
Paris is a city in France. Rome is a city in Italy. Berlin is in Germany.
Question: where did they go? Answer: to the store.
Document 1: the meeting is on Monday. Document 2: the report is due Friday.
1 2 3 4 5 6 7 8 9 0 + - * / = ( ) [ ] { } < > " ' ! ? , . : ;
"""

# (family name, model_type, extra config kwargs)
FAMILIES: tuple[str, ...] = (
    "gpt2",
    "stablelm",
    "granite",
    "cohere",
    "starcoder2",
    "gpt_bigcode",
    "helium",
    "seed_oss",
    "arcee",
    "ernie4_5",
    "smollm3",
    "glm",
    "jais2",
    "ministral3",
    "cwm",
    "gpt_neox",
    "gpt_neox_sequential",
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "qwen3",
    "olmo",
    "olmo2",
    "phi",
    "gptj",
    "falcon",
    "falcon_new",
    "falcon_alibi",
    "opt",
    "bloom",
    "gemma3_multimodal",
    "mpt",
    "gpt_neo",
    "nemotron",
    "persimmon",
    "exaone4",
    "codegen",
    "exaone",
    "internlm3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
)

#: the mixture-of-experts families (4 experts, top 2; Qwen2-MoE adds a shared expert)
MOE_FAMILIES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


#: families whose tiny model needs a newer transformers than the declared floor
#: (the floor lacks the model type, cannot initialise it, or has the older
#: experts layout): the floors CI job skips them with this reason
FAMILY_MIN_TRANSFORMERS: dict[str, str] = {
    "stablelm": "5.0",  # 4.56's _init_weights fails on bias-free q/k LayerNorms
    "jais2": "5.0",
    "ministral3": "5.0",
    "cwm": "5.0",
    "exaone": "5.0",  # 4.56 has no model type "exaone" (5.x maps it to Llama)
    "internlm3": "5.0",
    # the adapters refuse these under 4.x (Adapter.min_transformers_major)
    "opt": "5.0",
    "nemotron": "5.0",
    "persimmon": "5.0",
    # relevance propagation refuses ALiBi under 4.x (OLD_ALIBI_RELEVANCE)
    "mpt": "5.0",
    "falcon_alibi": "5.0",
    **{f: "5.0" for f in MOE_FAMILIES},  # fused experts (experts_implementation)
}


def family_skip_reason(family: str) -> str | None:
    """Why the installed transformers cannot build ``family``'s tiny model, or None.

    Example:
        >>> from attrlab.testing import family_skip_reason
        >>> family_skip_reason("gpt2") is None
        True
    """
    need = FAMILY_MIN_TRANSFORMERS.get(family)
    if need is None:
        return None
    have = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    if have >= tuple(int(x) for x in need.split(".")):
        return None
    return f"the tiny {family} model needs transformers >= {need} (installed {transformers.__version__})"


# extra config kwargs of the Llama-layout families built with AutoConfig.for_model
_LLAMA_LAYOUT: dict[str, dict[str, Any]] = {
    "helium": {},
    "seed_oss": dict(attention_bias=True),
    "arcee": {},
    "ernie4_5": {},
    "smollm3": dict(no_rope_layers=[1, 0]),  # layer 1 without rotary (NoPE)
    "glm": {},
    "jais2": {},
    "ministral3": {},
    "cwm": {},
    "exaone": {},  # loaded as LlamaForCausalLM
    "internlm3": {},  # loaded as LlamaForCausalLM
}


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a built-in text (no download).

    Adds ``<|endoftext|>`` as BOS/EOS/pad token; pads on the left.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.strip().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.padding_side = "left"
    return fast


def tiny_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    """A transformers config for a 2-layer random model of ``family``."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
    )

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    llama_like: dict[str, Any] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    cfg: Any
    if family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    elif family in ("gpt_neox", "gpt_neox_sequential"):
        cfg = GPTNeoXConfig(  # type: ignore[call-arg]  # rotary_pct: old name, still read
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            use_parallel_residual=family == "gpt_neox",
            rotary_pct=0.5,
            **common,
        )
    elif family == "llama":
        cfg = LlamaConfig(**llama_like)
    elif family == "mistral":
        cfg = MistralConfig(**llama_like)
    elif family == "qwen2":
        cfg = Qwen2Config(**llama_like)
    elif family == "stablelm":
        from transformers import StableLmConfig

        cfg = StableLmConfig(use_qkv_bias=True, qk_layernorm=True, **llama_like)
    elif family == "granite":
        from transformers import GraniteConfig

        cfg = GraniteConfig(
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.25,
            logits_scaling=4.0,
            attention_bias=True,
            **llama_like,
        )
    elif family == "cohere":
        from transformers import CohereConfig

        cfg = CohereConfig(logit_scale=0.5, use_qk_norm=True, **llama_like)
    elif family == "starcoder2":
        from transformers import Starcoder2Config

        cfg = Starcoder2Config(**llama_like)
    elif family == "gpt_bigcode":
        from transformers import GPTBigCodeConfig

        cfg = GPTBigCodeConfig(
            n_embd=32, n_layer=2, n_head=4, n_positions=128, n_inner=64, **common
        )  # multi_query=True: one shared key/value head
    elif family in _LLAMA_LAYOUT:
        # Llama-layout model types whose adapters are thin LlamaAdapter subclasses
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(family, head_dim=8, **llama_like, **_LLAMA_LAYOUT[family])
    elif family == "gemma":
        cfg = GemmaConfig(head_dim=8, **llama_like)
    elif family == "gemma2":
        cfg = Gemma2Config(head_dim=8, final_logit_softcapping=30.0, **llama_like)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(head_dim=8, **llama_like)
    elif family == "qwen3":
        from transformers import Qwen3Config

        cfg = Qwen3Config(head_dim=8, **llama_like)
    elif family == "olmo":
        from transformers import OlmoConfig

        cfg = OlmoConfig(**llama_like)
    elif family == "olmo2":
        from transformers import Olmo2Config

        cfg = Olmo2Config(**llama_like)
    elif family == "phi":
        from transformers import PhiConfig

        # phi-2's layout: partial rotary, one shared LayerNorm; partial_rotary_factor is
        # still read (into rope_parameters) but not in the signature
        cfg = PhiConfig(  # type: ignore[call-arg]
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            partial_rotary_factor=0.5,
            **common,
        )
    elif family == "gptj":
        from transformers import GPTJConfig

        cfg = GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_positions=128, rotary_dim=4, **common)
    elif family == "phi3":
        cfg = Phi3Config(**llama_like)
    elif family in ("falcon", "falcon_new", "falcon_alibi"):
        from transformers import FalconConfig

        layouts: dict[str, dict[str, Any]] = {
            "falcon": {},  # falcon-7b: parallel, multi-query, one shared norm
            "falcon_new": dict(new_decoder_architecture=True, num_kv_heads=2),  # 40b / 180b
            "falcon_alibi": dict(alibi=True, parallel_attn=False, multi_query=False, bias=True),
        }
        layout = layouts[family]
        cfg = FalconConfig(
            hidden_size=32,
            ffn_hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **layout,
            **common,
        )
    elif family == "opt":
        from transformers import OPTConfig

        cfg = OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            **common,
        )
    elif family == "bloom":
        from transformers import BloomConfig

        cfg = BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common)
    elif family == "gemma3_multimodal":
        # Gemma3ForConditionalGeneration: the Gemma 3 text stack plus a tiny vision tower
        from transformers import Gemma3Config, SiglipVisionConfig

        vision = SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        text = Gemma3TextConfig(head_dim=8, **llama_like)
        cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1)
    elif family == "mpt":
        from transformers import MptConfig

        cfg = MptConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=128, **common)
    elif family == "nemotron":
        from transformers import NemotronConfig

        cfg = NemotronConfig(head_dim=8, **llama_like)  # partial rotary (factor 0.5), relu2 MLP
    elif family == "codegen":
        from transformers import CodeGenConfig

        # 8 heads: two per model-parallel group of the fused qkv_proj
        cfg = CodeGenConfig(
            n_embd=32, n_layer=2, n_head=8, n_positions=128, n_inner=64, rotary_dim=2, **common
        )
    elif family == "exaone4":
        from transformers import Exaone4Config

        # layer 0 sliding-window with rotary, layer 1 global without
        cfg = Exaone4Config(sliding_window=4, sliding_window_pattern=2, **llama_like)
    elif family == "persimmon":
        from transformers import PersimmonConfig

        cfg = PersimmonConfig(  # qk_layernorm, partial rotary (factor 0.5), relu2 MLP
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **common,
        )
    elif family == "gpt_neo":
        from transformers import GPTNeoConfig

        # one global and one local layer, a local window shorter than the test prompts
        cfg = GPTNeoConfig(
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
            **common,
        )
    elif family in MOE_FAMILIES:
        from transformers import AutoConfig

        moe: dict[str, Any] = dict(num_experts_per_tok=2)
        if family == "mixtral":
            moe["num_local_experts"] = 4
        else:
            moe.update(num_experts=4, norm_topk_prob=family != "olmoe")
        if family in ("qwen2_moe", "qwen3_moe"):
            moe.update(moe_intermediate_size=16, head_dim=8)
        if family == "qwen2_moe":
            moe["shared_expert_intermediate_size"] = 24
        cfg = AutoConfig.for_model(family, **llama_like, **moe)
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
        if family == "gemma3_multimodal":  # the text stack reads its own config
            setattr(cfg.text_config, k, v)
    return cfg


def tiny_model(
    family: str = "gpt2",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    **overrides: Any,
) -> tuple[Any, PreTrainedTokenizerFast]:
    """A 2-layer random-weight model of ``family`` and the tiny tokenizer.

    Biases and norm weights are randomized too (HF initializes them to 0/1),
    so that tests exercise every term of the decompositions.
    """
    reason = family_skip_reason(family)
    if reason is not None:
        from .errors import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(reason)
    tok = tiny_tokenizer()
    extra: dict[str, Any] = {}
    if family in MOE_FAMILIES:
        # transformers' default experts kernel (grouped_mm) takes no float64 on CPU, and
        # tests cast models to float64: the eager loop over experts works in every dtype
        extra["experts_implementation"] = overrides.pop("experts_implementation", "eager")
    cfg = tiny_config(family, len(tok), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        cfg, attn_implementation=attn_implementation, dtype=dtype, **extra
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    model.eval()
    return model, tok


def plain_response_logprobs(lm: Any, prompt: Any, masks: Any) -> torch.Tensor:
    """The oracle for the sources engine: per-token log-probabilities of a
    :class:`~attrlab.units.sources.SourcePrompt`'s response under each mask,
    from one plain Hugging Face forward per ablated prompt (no cache, no
    batching), ``[n_masks, n_response]`` float64.

    Example:
        >>> import attrlab as al, torch
        >>> lm = al.wrap(*tiny_model("llama"))
        >>> p = al.units.Sources().prompt(lm, "A is red. B is blue.", " red")
        >>> masks = [[True, True], [False, True]]
        >>> bool(torch.allclose(plain_response_logprobs(lm, p, masks), p.logprobs(masks), atol=1e-5))
        True
    """
    out = []
    resp = torch.tensor(list(prompt.response_ids))
    for row in prompt.prompt_ids(masks):
        ids = torch.tensor([list(row) + list(prompt.response_ids)], device=lm.device)
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0, len(row) - 1 : -1]
        logp = logits.double().log_softmax(-1).cpu()
        out.append(logp.gather(-1, resp[:, None])[:, 0])
    return torch.stack(out)
