"""Word-level tokenizers of the zoo models, built with the ``tokenizers`` library.

Pre-tokenization is GPT-2's byte-level split, so a word keeps its leading
space exactly as in GPT-2: ``" Mary"`` and ``"Mary"`` are two different
tokens (``ĠMary`` and ``Mary``), punctuation is its own token and ``"\\n"`` is
``Ċ``. The vocabulary holds every piece the task's texts contain, plus every
word of the task in both forms, so names and answers are single tokens and
decoding gives back the text exactly. Unknown words map to ``<unk>``.

The post-processor prepends ``<|endoftext|>`` (BOS, also EOS and pad) when
special tokens are added, as ``transformers`` does by default; the models were
trained with it. Targets use the leading-space form: ``lm.token_id(" Mary")``.

Example:
    >>> from attrlab.zoo.tokenizer import build_tokenizer
    >>> tok = build_tokenizer(["When Mary and John went to the store."], words=["Tom"])
    >>> tok("When Tom went")["input_ids"][0] == tok.bos_token_id
    True
    >>> len(tok(" Tom", add_special_tokens=False)["input_ids"])
    1
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BOS = "<|endoftext|>"
UNK = "<unk>"


def pieces(text: str) -> list[str]:
    """The byte-level pre-tokens of ``text`` (e.g. ``['When', 'ĠMary']``).

    Example:
        >>> pieces("When Mary went.")
        ['When', 'ĠMary', 'Ġwent', '.']
    """
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return [p for p, _ in pre.pre_tokenize_str(text)]


def build_tokenizer(texts: Iterable[str], words: Iterable[str] = ()) -> Any:
    """A ``PreTrainedTokenizerFast`` whose vocabulary is every piece of ``texts``
    plus every word of ``words`` with and without a leading space.

    The vocabulary is sorted, so the same inputs always give the same ids.

    Example:
        >>> tok = build_tokenizer(["a b c"])
        >>> tok.decode(tok("a b c", add_special_tokens=False)["input_ids"])
        'a b c'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    found: set[str] = set()
    for t in texts:
        found.update(pieces(t))
    for w in words:
        found.update(pieces(w))
        found.update(pieces(" " + w))
    found.update(pieces("\n"))
    vocab = {BOS: 0, UNK: 1}
    for p in sorted(found):
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=BOS,
        unk_token=UNK,
        padding_side="left",
    )


def save_tokenizer(tok: Any, path: str | Path) -> None:
    """Save ``tok`` to ``path`` (``tokenizer.json`` + ``tokenizer_config.json``),
    naming the class ``PreTrainedTokenizerFast`` so transformers 4 and 5 both load it.

    Example:
        >>> import tempfile
        >>> from transformers import AutoTokenizer
        >>> d = tempfile.mkdtemp()
        >>> save_tokenizer(build_tokenizer(["a b"]), d)
        >>> AutoTokenizer.from_pretrained(d).convert_ids_to_tokens([0, 2])
        ['<|endoftext|>', 'a']
    """
    tok.save_pretrained(str(path))
    cfg_path = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
