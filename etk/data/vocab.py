"""Object and label vocabularies, and the single-token check against a tokenizer."""

from __future__ import annotations

import csv
from importlib import resources
from typing import Sequence

from etk.errors import EtkError

LETTERS: tuple[str, ...] = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))


def load_words(name: str, column: str) -> list[str]:
    """One column of a word list shipped with etk (`etk/data/<name>`)."""
    text = resources.files("etk.data").joinpath(name).read_text()
    return [row[column].strip() for row in csv.DictReader(text.splitlines()) if row[column].strip()]


def load_objects(name: str = "objects.csv") -> list[str]:
    """Object nouns shipped with etk (`objects.csv` is the paper's 85-noun list, by BNC frequency)."""
    return load_words(name, "object_name")


def single_token_id(tokenizer, word: str) -> int | None:
    """Id of `' ' + word` if it is exactly one token that decodes back to the word, else None."""
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    if len(ids) != 1:
        return None
    if tokenizer.decode(ids).strip() != word:  # e.g. an <unk> piece
        return None
    return ids[0]


class VocabularyError(EtkError, ValueError):
    """Too few single-token words for the requested task."""


def filter_single_token(tokenizer, words: Sequence[str], need: int, kind: str) -> list[str]:
    """Keep the words that are one token (with the leading space); fail clearly if fewer than `need` remain."""
    kept = [w for w in words if single_token_id(tokenizer, w) is not None]
    dropped = [w for w in words if w not in kept]
    if len(kept) < need:
        raise VocabularyError(
            f"tokenizer {tokenizer_name(tokenizer)!r}: only {len(kept)} of {len(words)} {kind} are single tokens, "
            f"{need} needed. Multi-token {kind}: {dropped[:30]}{' ...' if len(dropped) > 30 else ''}"
        )
    return kept


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
