"""Object and label vocabularies, and the single-token check against a tokenizer."""

from __future__ import annotations

import csv
import sys
from importlib import resources
from pathlib import Path
from typing import Sequence

from etk.errors import EtkError

LETTERS: tuple[str, ...] = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))


def load_words(name: str, column: str) -> list[str]:
    """One column of a word list shipped with etk (`etk/data/<name>`)."""
    text = resources.files("etk.data").joinpath(name).read_text()
    return [row[column].strip() for row in csv.DictReader(text.splitlines()) if row[column].strip()]


SHIPPED_OBJECTS = ("objects.csv", "objects_train.csv")


def load_objects(name: str = "objects.csv") -> list[str]:
    """Object nouns: a list shipped with etk (`objects.csv` is the paper's 85-noun list, by BNC frequency;
    `objects_train.csv` the disjoint fine-tuning list) or a user file: a CSV with an `object_name` column, or a text
    file with one word a line (blank lines and `#` comments ignored)."""
    if name in SHIPPED_OBJECTS:
        return load_words(name, "object_name")
    path = Path(name).expanduser()
    if not path.is_file():
        raise VocabularyError(f"data.objects={name!r} is neither a list shipped with etk ({', '.join(SHIPPED_OBJECTS)}) "
                              f"nor a readable file; pass a path to a CSV with an 'object_name' column or a text file "
                              f"with one word a line")
    text = path.read_text()
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "object_name" not in rows[0]:
            raise VocabularyError(f"{path}: a CSV objects file needs an 'object_name' column (found "
                                  f"{list(rows[0]) if rows else 'no rows'}); or use a .txt file with one word a line")
        words = [r["object_name"].strip() for r in rows if (r["object_name"] or "").strip()]
    else:
        words = [w.strip() for w in text.splitlines() if w.strip() and not w.strip().startswith("#")]
    if len(set(words)) != len(words):
        dup = sorted({w for w in words if words.count(w) > 1})
        raise VocabularyError(f"{path}: repeated words {dup[:10]}: every object must be distinct (a prompt names each once)")
    return words


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
    if dropped and len(kept) >= need:
        _note_once(f"[etk] {kind}: {len(dropped)} of {len(words)} words are not one token for tokenizer "
                   f"{tokenizer_name(tokenizer)!r} and are left out: {dropped[:30]}{' ...' if len(dropped) > 30 else ''}")
    if len(kept) < need:
        raise VocabularyError(
            f"tokenizer {tokenizer_name(tokenizer)!r}: only {len(kept)} of {len(words)} {kind} are single tokens, "
            f"{need} needed. Multi-token {kind}: {dropped[:30]}{' ...' if len(dropped) > 30 else ''}"
        )
    return kept


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    """Print a message the first time it comes up in this process (prompts are built many times per run)."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(message, file=sys.stderr)


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
