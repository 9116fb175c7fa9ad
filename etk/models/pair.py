"""Model pairs (base, fine-tuned), validated before any work: same architecture and shapes, same tokenizer
vocabulary, and identical token ids for the prompts that will be run."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from omegaconf import OmegaConf

from etk.data.roles import MEMBERS
from etk.errors import ConfigError, EtkError
from etk.models.arch import LlamaFamily

WEIGHT_KEYS = ("source", "path", "root_subdir", "package", "gguf_file", "tiny", "dtype", "attn_implementation")


class PairMismatchError(EtkError, ValueError):
    """The two models of a pair cannot be compared component by component."""


def check_compatible(a, b, tok_a, tok_b, names: tuple[str, str] = MEMBERS, texts: Sequence[str] = ()) -> None:
    """Raise PairMismatchError naming the first difference (architecture, dims, tokenizer vocabulary, prompt ids)."""
    if type(LlamaFamily.of(a).base) is not type(LlamaFamily.of(b).base):
        raise PairMismatchError(f"architecture differs: {names[0]} is {type(a).__name__}, {names[1]} is {type(b).__name__}")
    da, db = LlamaFamily.of(a).dims, LlamaFamily.of(b).dims
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


def toggled_adapter(base_cfg: dict[str, Any], finetuned_cfg: dict[str, Any]) -> str | None:
    """The one LoRA adapter that turns the base member into the fine-tuned one, when both load the same weights
    and the fine-tuned adapter stack is the base stack plus that adapter; else None (two models are loaded)."""
    if any(base_cfg.get(k) != finetuned_cfg.get(k) for k in WEIGHT_KEYS):
        return None
    a, b = list(base_cfg.get("adapters") or []), list(finetuned_cfg.get("adapters") or [])
    return b[-1] if len(b) == len(a) + 1 and b[:len(a)] == a else None


@dataclass
class PairModels:
    """The two members of a pair. With `toggled`, `base` and `finetuned` are one PeftModel whose adapter is
    switched off to run the base member: a single copy of the base weights is in memory."""

    base: Any
    finetuned: Any
    tokenizer: Any
    finetuned_tokenizer: Any
    names: tuple[str, str]
    toggled: bool = False

    def check(self, texts: Sequence[str] = ()) -> None:
        """check_compatible on the two members, and on the ids of `texts` (the prompts that will be run)."""
        check_compatible(self.base, self.finetuned, self.tokenizer, self.finetuned_tokenizer, self.names, texts)

    @contextmanager
    def use(self, member: str) -> Iterator[Any]:
        """The member's model, ready to run (adapter off for the base member of a toggled pair)."""
        if member not in MEMBERS:
            raise ConfigError(f"pair member must be 'base' or 'finetuned', got {member!r}")
        model = self.base if member == "base" else self.finetuned
        with model.disable_adapter() if self.toggled and member == "base" else nullcontext():
            yield model


def load_pair(base_cfg: dict[str, Any], finetuned_cfg: dict[str, Any], toggle: bool = True) -> PairModels:
    """Load and validate a pair. A LoRA fine-tune of the base member (same weights + one adapter) is run by
    toggling that adapter (`toggle=True`); otherwise each member is loaded (adapters merged at load)."""
    from etk.models.loading import attach_adapter, load_model, preloaded_model, shared_model

    names = (base_cfg["name"], finetuned_cfg["name"])
    held = preloaded_model(base_cfg), preloaded_model(finetuned_cfg)
    if all(held):  # two models already in memory (the Python API): run them as they are, never wrap them
        (base, tok), (ft, ft_tok) = held
        pair = PairModels(base, ft, tok, ft_tok, names)
        pair.check()
        return pair
    extra = toggled_adapter(base_cfg, finetuned_cfg) if toggle else None
    if extra is not None:
        base, tok = load_model(OmegaConf.create(base_cfg))
        shared = attach_adapter(base, extra)
        return PairModels(shared, shared, tok, tok, names, toggled=True)
    # two merged members: the models a study keeps loaded (`reuse_models`) when it holds them, else loaded
    base, tok = shared_model(OmegaConf.create(base_cfg))
    ft, ft_tok = shared_model(OmegaConf.create(finetuned_cfg))
    pair = PairModels(base, ft, tok, ft_tok, names)
    pair.check()
    return pair
