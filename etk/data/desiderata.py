"""DCM / activation-patching data: base prompts split by context, sources drawn within each split,
targets from the desideratum (SPEC §4.1, with [BUG-pos], [BUG-substr], [BUG-label] fixed)."""

from __future__ import annotations

import random
from functools import partial
from typing import Sequence

from torch.utils.data import DataLoader

from etk.data.boxes import Example
from etk.data.datasets import EncodedDataset, RankSlicedBatches, pad_id
from etk.data.pairs import DESIDERATA, Pair
from etk.data.roles import PairBatch, collate_pairs, encode_example
from etk.errors import ConfigError


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


def pair_loader(tokenizer, pairs: Sequence[Pair], batch_size: int, shuffle: bool = False, seed: int = 0,
                padding_side: str = "right") -> DataLoader:
    """Batches of PairBatch: base prompts answer the pair's target; sources carry their own roles. Batches are
    `RankSlicedBatches`: under DDP (fit loops with `use_distributed_sampler=False`) every process takes its slice
    of the one-process batch."""
    items = [(encode_example(tokenizer, p.base, answer=p.target), encode_example(tokenizer, p.source), p.source_box)
             for p in pairs]
    return DataLoader(EncodedDataset(items), batch_sampler=RankSlicedBatches(len(items), batch_size, shuffle, seed),
                      collate_fn=partial(collate_pairs, pad_id=pad_id(tokenizer), padding_side=padding_side, cls=PairBatch))
