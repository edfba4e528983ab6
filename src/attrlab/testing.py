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
)


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
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
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
    tok = tiny_tokenizer()
    cfg = tiny_config(family, len(tok), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        cfg, attn_implementation=attn_implementation, dtype=dtype
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    model.eval()
    return model, tok
