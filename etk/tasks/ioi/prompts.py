"""IOI prompts (Wang et al. 2022, arXiv 2211.00593): templates, the ABBA / BABA orders, the ABC corruption, and their
tokenization with every role located by character offsets.

A template names three name slots, {A} {B} {C}, plus {place} and {object}: "When {A} and {B} went to the {place},
{C} gave a {object} to". The indirect object (IO) fills A (ABBA) or B (BABA), the subject S the other and C (its
second mention, S2); the answer is " IO". An ABC prompt puts a third name in C: no answer, the same positions."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, replace
from typing import Sequence

from etk.data.roles import ROLE_ID, Encoded, TokenizationError
from etk.data.vocab import _note_once, filter_single_token, load_words, single_token_id, tokenizer_name
from etk.errors import ConfigError, DataError

SCALAR_ROLES: tuple[str, ...] = ("last", "IO", "S1", "S1+1", "S2")  # `last` = END, where the answer is read
TEMPLATE_ROLES: tuple[str, ...] = ("bos", "place", "item", "ioi_text", "other")
ROLES: tuple[str, ...] = SCALAR_ROLES + TEMPLATE_ROLES
SLOTS = frozenset({"A", "B", "C", "place", "object"})

TEMPLATES: tuple[str, ...] = (  # 14 tokens each for SmolLM2's tokenizer (every filler one token)
    "When {A} and {B} went to the {place}, {C} gave a {object} to",
    "When {A} and {B} got to the {place}, {C} handed a {object} to",
    "After {A} and {B} went to the {place}, {C} gave a {object} to",
    "While {A} and {B} were at the {place}, {C} passed a {object} to",
)
PLACES: tuple[str, ...] = ("store", "park", "school", "garden", "office", "hospital", "station", "restaurant",
                           "market", "beach", "house", "library")
OBJECTS: tuple[str, ...] = ("drink", "book", "ball", "ring", "key", "snack", "bone", "necklace", "computer",
                            "letter", "gift", "kiss")


def check_template(fmt: str) -> str:
    """`fmt` if it holds {A}, {B}, {C} once each (A before B before C) and only known slots, else a ConfigError."""
    names = [n for _, n, _, _ in string.Formatter().parse(fmt) if n is not None]
    if set(names) - SLOTS or any(names.count(s) != 1 for s in ("A", "B", "C")):
        raise ConfigError(f"task.templates: {fmt!r} must contain {{A}}, {{B}} and {{C}} once each and only the slots "
                          f"{sorted(SLOTS)} (e.g. 'When {{A}} and {{B}} went to the {{place}}, {{C}} gave a {{object}} to')")
    if [n for n in names if n in "ABC"] != ["A", "B", "C"]:
        raise ConfigError(f"task.templates: {fmt!r} must name {{A}}, {{B}}, {{C}} in that order (C is the second "
                          "mention of the subject)")
    return fmt


@dataclass(frozen=True)
class IOIPrompt:
    """One IOI prompt: names in slots A, B, C; `io_first` says whether the IO fills A (ABBA) or B (BABA)."""

    template: str
    a: str
    b: str
    c: str
    io_first: bool
    place: str
    obj: str

    @property
    def io(self) -> str:
        return self.a if self.io_first else self.b

    @property
    def s(self) -> str:
        return self.b if self.io_first else self.a

    @property
    def order(self) -> str:
        return "ABBA" if self.io_first else "BABA"

    @property
    def answer(self) -> str | None:
        """The IO when C repeats the subject; None for an ABC prompt (three distinct names)."""
        return self.io if self.c == self.s else None

    @property
    def distractor(self) -> str | None:
        return self.s if self.answer is not None else None

    def render(self) -> tuple[str, dict[str, tuple[int, int]], list[tuple[int, int, str]]]:
        """The text, the character span of each slot, and (start, end, piece) of every piece (slots and literals)."""
        values = {"A": self.a, "B": self.b, "C": self.c, "place": self.place, "object": self.obj}
        text, spans, pieces = "", {}, []
        for literal, name, _, _ in string.Formatter().parse(self.template):
            if literal:
                pieces.append((len(text), len(text) + len(literal), "ioi_text"))
                text += literal
            if name is not None:
                spans[name] = (len(text), len(text) + len(values[name]))
                pieces.append((*spans[name], name))
                text += values[name]
        return text, spans, pieces


def encode_prompt(tokenizer, p: IOIPrompt, answer: str | None = None) -> Encoded:
    """Token ids, the scalar roles (IO, S1, S1+1, S2, last), the token-role partition, the answer (" IO", or
    `answer`) and the distractor (" S")."""
    text, spans, pieces = p.render()
    enc = tokenizer(text, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]

    def token_of(slot: str) -> int:
        start, end = spans[slot]
        for i, (s, e) in enumerate(offsets):
            if e > s and s <= start < e:
                if text[s:e].strip() != text[start:end]:
                    raise TokenizationError(f"tokenizer {tokenizer_name(tokenizer)!r} does not keep {text[start:end]!r} "
                                            f"as one token in {text!r}; choose single-token names")
                return i
        raise TokenizationError(f"no token covers {text[start:end]!r} in {text!r}")

    a, b, c = token_of("A"), token_of("B"), token_of("C")
    io, s1 = (a, b) if p.io_first else (b, a)
    roles: dict[str, int | list[int]] = {"last": len(ids) - 1, "IO": io, "S1": s1, "S1+1": s1 + 1, "S2": c}
    piece_role = {"A": None, "B": None, "C": None, "place": "place", "object": "item", "ioi_text": "ioi_text"}
    token_roles = []
    for s, e in offsets:
        ch = next((i for i in range(s, e) if not text[i].isspace()), s if e > s else None)
        name = "bos" if ch is None else next((piece_role[r] for x, y, r in pieces if x <= ch < y), "other")
        token_roles.append(ROLE_ID[name or "other"])
    for role in ("S1+1", "IO", "S1", "S2", "last"):
        token_roles[roles[role]] = ROLE_ID[role]  # type: ignore[index]
    word = answer if answer is not None else p.answer

    def word_id(w: str | None) -> int:
        if w is None:
            return -1
        tid = single_token_id(tokenizer, w)
        if tid is None:
            raise TokenizationError(f"tokenizer {tokenizer_name(tokenizer)!r} splits {w!r} into several tokens")
        return tid

    return Encoded(ids, roles, word_id(word), token_roles, distractor_id=word_id(p.distractor))


@dataclass(frozen=True)
class Vocabulary:
    """The fillers usable with one tokenizer: single-token names; the places and the objects of the fewest tokens
    (one, for real tokenizers); the templates whose prompts have the first template's token count. Every prompt then
    has one length (mean ablation averages per absolute position)."""

    names: tuple[str, ...]
    places: tuple[str, ...]
    objects: tuple[str, ...]
    templates: tuple[str, ...]


def vocabulary(tokenizer, names_file: str, places: Sequence[str], objects: Sequence[str],
               templates: Sequence[str]) -> Vocabulary:
    names = filter_single_token(tokenizer, load_words(names_file, "name") if names_file == "names.csv"
                                else _user_words(names_file), 6, "names")
    pl, ob = shortest(tokenizer, places, "places"), shortest(tokenizer, objects, "objects")
    usable, length = [], None
    for t in (check_template(t) for t in templates):
        probe = IOIPrompt(t, names[0], names[1], names[1], True, pl[0], ob[0])
        n = len(tokenizer(probe.render()[0])["input_ids"])
        if length is None:
            length = n
        if n == length:
            usable.append(t)
        else:
            _note_once(f"[etk] ioi: template {t!r} has {n} tokens for tokenizer {tokenizer_name(tokenizer)!r}, not "
                       f"{length} like the first; left out (mean ablation averages per position: one length)")
    return Vocabulary(tuple(names), tuple(pl), tuple(ob), tuple(usable))


def shortest(tokenizer, words: Sequence[str], kind: str) -> list[str]:
    """The words of the fewest tokens (with the leading space), in order; a note names those left out."""
    if not words:
        raise ConfigError(f"task.{kind} is empty")
    n = {w: len(tokenizer.encode(" " + w, add_special_tokens=False)) for w in words}
    kept = [w for w in words if n[w] == min(n.values())]
    if len(kept) < len(words):
        _note_once(f"[etk] ioi {kind}: {[w for w in words if w not in kept]} take more tokens than {kept[0]!r} for "
                   f"tokenizer {tokenizer_name(tokenizer)!r} and are left out (one prompt length)")
    return kept


def _user_words(path: str) -> list[str]:
    from pathlib import Path

    f = Path(path).expanduser()
    if not f.is_file():
        raise ConfigError(f"task.names={path!r} is neither 'names.csv' (shipped) nor a readable file of one name a line")
    return [w.strip() for w in f.read_text().splitlines() if w.strip() and not w.startswith("#")]


def generate(n: int, vocab: Vocabulary, seed: int, abc: bool = False) -> list[IOIPrompt]:
    """`n` prompts, seeded: ABBA and BABA alternate, templates, places and objects drawn uniformly, two distinct
    names (three for `abc`: the ABC distribution, no answer)."""
    if len(vocab.names) < 3:
        raise DataError("IOI needs at least 3 single-token names")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t, place, obj = rng.choice(vocab.templates), rng.choice(vocab.places), rng.choice(vocab.objects)
        io, s, third = rng.sample(vocab.names, 3)
        io_first = i % 2 == 0
        a, b = (io, s) if io_first else (s, io)
        out.append(IOIPrompt(t, a, b, third if abc else s, io_first, place, obj))
    return out


def fresh_names(rng: random.Random, names: Sequence[str], avoid: set[str], k: int) -> list[str]:
    pool = [n for n in names if n not in avoid]
    if len(pool) < k:
        raise DataError(f"need {k} names other than {sorted(avoid)}; the vocabulary has {len(names)}")
    return rng.sample(pool, k)


def with_names(p: IOIPrompt, io: str, s: str, c: str | None = None, io_first: bool | None = None) -> IOIPrompt:
    """`p` with IO `io`, subject `s` (C = `c`, default the subject) and, if given, the other order."""
    first = p.io_first if io_first is None else io_first
    a, b = (io, s) if first else (s, io)
    return replace(p, a=a, b=b, c=s if c is None else c, io_first=first)
