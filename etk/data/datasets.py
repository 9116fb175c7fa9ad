"""From a task's prompts to batches: datasets stamped with indices, rank-sliced batches, and the loaders."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Sequence

from torch.utils.data import DataLoader, Dataset, Sampler

from etk.data.roles import Encoded, PairBatch, collate, collate_pairs
from etk.errors import DataError


class EncodedDataset(Dataset):
    """A list of tokenized prompts (or of (base, source, ...) tuples of them). Each item comes out stamped with its
    dataset index, which batches carry (`PromptBatch.index`) so that results computed on several processes can be
    put back in dataset order and the distributed sampler's repeats dropped."""

    def __init__(self, items: Sequence):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        it = self.items[i]
        stamp = {"index": int(i), "weight": 0.0 if isinstance(i, Repeat) else 1.0}
        if isinstance(it, Encoded):
            return replace(it, **stamp)
        if isinstance(it, tuple) and it and isinstance(it[0], Encoded):
            return (replace(it[0], **stamp), *it[1:])
        return it


class Repeat(int):
    """A dataset index drawn again only to give a distributed process a full share of a short batch: the item comes
    out with loss weight 0, and its results are dropped as a repeat of the same index."""


class RankSlicedBatches(Sampler):
    """The one-process batches (sequential, or shuffled with a seed: the same order on every process), each split
    across the processes of a distributed run: process r gets examples r, r + W, ... of every batch. The processes'
    shares together are exactly the one-process batch; a short share is filled with weight-0 `Repeat`s of the batch's
    first example, so the weighted loss (`weighted_mean`) averaged by DDP gives the one-process gradient and
    per-example results gathered by index (repeats dropped) are the one-process results. Rank and world size are
    read when iterating (the process group starts with the fit). With one process it yields exactly the batches of
    `DataLoader(..., shuffle=..., generator=Generator().manual_seed(seed))` (tested)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool = False, seed: int = 0):
        import torch

        self.n, self.batch_size, self.shuffle = n, int(batch_size), shuffle
        self.generator = torch.Generator().manual_seed(seed) if shuffle else None  # one permutation per epoch

    def __iter__(self):
        import torch
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        if self.shuffle:  # the draws of DataLoader(shuffle=True, generator=g): its base seed, then RandomSampler's
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            order = torch.randperm(self.n, generator=self.generator).tolist()
            torch.randperm(self.n, generator=self.generator)  # RandomSampler's (empty) remainder draw
        else:
            order = list(range(self.n))
        for i in range(0, self.n, self.batch_size):
            batch = order[i:i + self.batch_size]
            share = batch[rank::world]
            # every process needs a non-empty, equally long share (DDP steps together): fill with weight-0 repeats
            yield share + [Repeat(batch[0])] * (-(-len(batch) // world) - len(share))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise DataError("tokenizer has neither a pad nor an eos token")
    return pid


def prompt_loader(task, tokenizer, examples: Sequence, batch_size: int, padding_side: str = "right") -> DataLoader:
    """A task's prompts encoded once and batched (no shuffling: order is the dataset's line order)."""
    encoded: list[Encoded] = [task.encode(tokenizer, ex) for ex in examples]
    return DataLoader(
        EncodedDataset(encoded),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=partial(collate, pad_id=pad_id(tokenizer), padding_side=padding_side),
    )


def pair_loader(task, tokenizer, pairs: Sequence, batch_size: int, shuffle: bool = False, seed: int = 0,
                padding_side: str = "right", cls=PairBatch) -> DataLoader:
    """Batches of `cls` (a PairBatch): base prompts answer the pair's target; sources carry their own roles (and
    their own answer). Batches are `RankSlicedBatches`: under DDP (fit loops with `use_distributed_sampler=False`)
    every process takes its slice of the one-process batch."""
    items = [(task.encode(tokenizer, p.base, answer=p.target), task.encode(tokenizer, p.source), p.source_box)
             for p in pairs]
    return DataLoader(EncodedDataset(items), batch_sampler=RankSlicedBatches(len(items), batch_size, shuffle, seed),
                      collate_fn=partial(collate_pairs, pad_id=pad_id(tokenizer), padding_side=padding_side, cls=cls))
