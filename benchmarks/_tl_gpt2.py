"""The TransformerLens copy of a Hugging Face GPT-2, shared by the benchmarks
whose peer runs on TransformerLens (``bench_patching.py``, ``bench_atp.py
--autocircuit``). Imported only inside the peer venvs (``benchmarks/_envs``).

No weight processing (no LayerNorm folding, no centering, no value-bias
folding), so activations and logits match the Hugging Face model.
"""

from __future__ import annotations

from typing import Any


def hooked_gpt2(hf: Any) -> Any:
    """A ``HookedTransformer`` with ``hf``'s (a ``GPT2LMHeadModel``) weights, unprocessed.

    Example (peer venv only)::

        model = hooked_gpt2(GPT2LMHeadModel.from_pretrained(path))
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        act_fn=c.activation_function,
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False,
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return model
