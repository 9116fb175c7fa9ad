"""From config to batches: task vocabulary for a tokenizer, the evaluation set, and data loaders."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Sequence

from torch.utils.data import DataLoader, Dataset, Sampler

from etk.data.boxes import Example, Template, generate_examples
from etk.data.roles import Encoded, collate, encode_example
from etk.data.vocab import LETTERS, filter_single_token, load_objects
from etk.errors import DataError


def task_vocab(tokenizer, n_boxes: int, objects_file: str = "objects.csv") -> tuple[list[str], list[str]]:
    """Objects and labels that are single tokens for this tokenizer (clear error if fewer than n_boxes)."""
    objects = filter_single_token(tokenizer, load_objects(objects_file), n_boxes, "objects")
    labels = filter_single_token(tokenizer, list(LETTERS), n_boxes, "labels")
    return objects, labels


def make_template(spec: dict | None) -> Template:
    return Template(**(spec or {}))


def check_box_count(path, lines: Sequence[tuple[int, Example]], n_boxes: int, error: type[Exception] = DataError) -> None:
    """Every prompt of the file `path` (its `read_jsonl_lines`) has `n_boxes` boxes, else `error` saying what to set."""
    counts = sorted({len(ex.context.objects) for _, ex in lines})
    if counts and counts != [n_boxes]:
        raise error(f"data.path={path!r}: its prompts have {', '.join(map(str, counts))} boxes but data.n_boxes="
                    f"{n_boxes}; set data.n_boxes={counts[0]}" + (" and use one file per box count" if len(counts) > 1 else ""))


def file_examples(data_cfg, tokenizer) -> list[Example]:
    """The first `data.n_examples` usable lines of the user's paper-format file `data.path`: lines whose objects or
    labels are not one token for this tokenizer are left out with a message naming them and their lines; every
    prompt must have `data.n_boxes` boxes (mean ablation and the pairs need one prompt shape)."""
    from etk.data.jsonl import read_jsonl_lines
    from etk.data.vocab import _note_once, single_token_id, tokenizer_name

    path = data_cfg.path
    lines = read_jsonl_lines(path)
    check_box_count(path, lines, int(data_cfg.n_boxes))
    words = {w for _, ex in lines for w in (*ex.context.objects, *ex.context.labels)}
    multi = sorted(w for w in words if single_token_id(tokenizer, w) is None)
    kept = [(n, ex) for n, ex in lines if not set(multi) & {*ex.context.objects, *ex.context.labels}]
    if multi:
        kept_lines = {n for n, _ in kept}
        dropped = [n for n, _ in lines if n not in kept_lines]
        _note_once(f"[etk] {path}: {len(dropped)} of {len(lines)} lines name words that are not one token for tokenizer "
                   f"{tokenizer_name(tokenizer)!r} ({multi[:20]}) and are left out (lines {dropped[:20]}"
                   f"{' ...' if len(dropped) > 20 else ''})")
    if not kept:
        raise DataError(f"data.path={path!r}: no usable line ({len(lines)} read); every object and label must be one "
                        f"token for tokenizer {tokenizer_name(tokenizer)!r}")
    return [ex for _, ex in kept][: int(data_cfg.n_examples)]


def task_examples(data_cfg, tokenizer) -> list[Example]:
    """The evaluation prompts: the user's file `data.path` if set, else generated as described by
    `data.{n_boxes,n_examples,seed,objects,template}`."""
    if data_cfg.get("path"):
        return file_examples(data_cfg, tokenizer)
    objects, labels = task_vocab(tokenizer, data_cfg.n_boxes, data_cfg.get("objects", "objects.csv"))
    template = make_template(data_cfg.get("template"))
    return generate_examples(data_cfg.n_examples, data_cfg.n_boxes, objects, labels, data_cfg.seed, template)


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


def prompt_loader(tokenizer, examples: Sequence[Example], batch_size: int, padding_side: str = "right") -> DataLoader:
    """Encode examples once and batch them (no shuffling: order is the dataset's line order)."""
    encoded: list[Encoded] = [encode_example(tokenizer, ex) for ex in examples]
    return DataLoader(
        EncodedDataset(encoded),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=partial(collate, pad_id=pad_id(tokenizer), padding_side=padding_side),
    )
