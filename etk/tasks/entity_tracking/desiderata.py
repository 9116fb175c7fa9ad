"""DCM / activation-patching data: base prompts split by context, sources drawn within each split,
targets from the desideratum (SPEC §4.1, with [BUG-pos], [BUG-substr], [BUG-label] fixed)."""

from __future__ import annotations

import random
from typing import Sequence

from etk.errors import ConfigError
from etk.tasks.base import Pair
from etk.tasks.entity_tracking.boxes import Example
from etk.tasks.entity_tracking.pairs import DESIDERATA


def split_by_context(examples: Sequence[Example], sizes: Sequence[int]) -> list[list[Example]]:
    """Consecutive splits of whole contexts holding about `sizes` prompts each (no context in two splits)."""
    out, i = [], 0
    for n in sizes:
        part: list[Example] = []
        while i < len(examples) and len(part) < n:
            ctx = examples[i].context
            while i < len(examples) and examples[i].context == ctx:
                part.append(examples[i])
                i += 1
        if len(part) < n:
            raise ConfigError(f"not enough prompts for splits {list(sizes)}: generate at least {sum(sizes)} examples")
        out.append(part)
    return out


def desideratum_pairs(name: str, bases: Sequence[Example], seed: int, legacy: bool = False) -> list[Pair]:
    """Pairs for one split; sources are drawn from the same split."""
    if name not in DESIDERATA:
        raise ConfigError(f"unknown desideratum {name!r}; choose from {sorted(DESIDERATA)}")
    kw = {"legacy": legacy} if name == "positional" else {}
    return DESIDERATA[name](bases, bases, random.Random(seed), **kw)
