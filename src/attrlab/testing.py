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
    "gpt_neox",
    "gpt_neox_sequential",
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
)


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
    elif family == "gemma":
        cfg = GemmaConfig(head_dim=8, **llama_like)
    elif family == "gemma2":
        cfg = Gemma2Config(head_dim=8, final_logit_softcapping=30.0, **llama_like)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(head_dim=8, **llama_like)
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
