"""Entity tracking's prompts from a config: the vocabulary for a tokenizer, the template, generated prompts or the
user's paper-format file (`data.path`)."""

from __future__ import annotations

from typing import Sequence

from etk.data.vocab import LETTERS, filter_single_token, load_objects
from etk.errors import DataError
from etk.tasks.entity_tracking.boxes import Example, Template, generate_examples


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
    from etk.data.vocab import _note_once, single_token_id, tokenizer_name
    from etk.tasks.entity_tracking.jsonl import read_jsonl_lines

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
