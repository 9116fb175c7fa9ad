"""Model pairs (base, fine-tuned), validated before any work: same architecture and shapes, same tokenizer
vocabulary, and identical token ids for the prompts that will be run."""

from __future__ import annotations

from typing import Sequence

from etk.models.arch import LlamaFamily


class PairMismatchError(ValueError):
    """The two models of a pair cannot be compared component by component."""


def check_compatible(a, b, tok_a, tok_b, names: tuple[str, str] = ("base", "finetuned"), texts: Sequence[str] = ()) -> None:
    """Raise PairMismatchError naming the first difference (architecture, dims, tokenizer vocabulary, prompt ids)."""
    if type(LlamaFamily(a).base) is not type(LlamaFamily(b).base):
        raise PairMismatchError(f"architecture differs: {names[0]} is {type(a).__name__}, {names[1]} is {type(b).__name__}")
    da, db = LlamaFamily(a).dims, LlamaFamily(b).dims
    for field in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "d_model", "vocab_size"):
        if getattr(da, field) != getattr(db, field):
            raise PairMismatchError(f"{field} differs: {names[0]} has {getattr(da, field)}, {names[1]} has {getattr(db, field)}")
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:5]
        raise PairMismatchError(f"tokenizer vocabularies differ (first differences: {diff})")
    for t in texts:
        if tok_a(t)["input_ids"] != tok_b(t)["input_ids"]:
            raise PairMismatchError(f"the tokenizers encode {t!r} differently")
