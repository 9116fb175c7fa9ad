"""What positional information the Position Transmitter / Detector heads carry (the paper's third open question):
for a pair whose source's queried box sits somewhere in the source, each hypothesis names the base object the patched
model should then answer. Same-length, unedited pairs make all of them agree; the paper's positional variants (text
inserted before, between or after segments) and cross-length pairs (a source with another box count) pull them apart.

- `ordinal_start`: the base object at the source's query index counted from the first box (the paper's reading);
- `ordinal_end`: the same index counted from the last box;
- `offset_start`: the base object whose token is nearest the source's queried object's token offset from the start;
- `offset_end`: the same with offsets counted back from the last token."""

from __future__ import annotations

import random
from typing import Sequence

from etk.data.roles import Encoded
from etk.tasks.base import Pair
from etk.tasks.entity_tracking.boxes import Example
from etk.tasks.entity_tracking.pairs import _draw_source

HYPOTHESES: tuple[str, ...] = ("ordinal_start", "ordinal_end", "offset_start", "offset_end")


def nearest(positions: Sequence[int], target: int) -> int:
    """Index of the position nearest `target` (the first of equals)."""
    return min(range(len(positions)), key=lambda i: (abs(positions[i] - target), i))


def hypothesis_targets(pair: Pair, base: Encoded, source: Encoded) -> dict[str, str | None]:
    """Each hypothesis's target word for `pair` (None where the hypothesis names no base box), from the two prompts'
    encodings (unpadded role positions)."""
    b, s = pair.base, pair.source
    objects, n_b, n_s, q = b.context.objects, b.context.n_boxes, s.context.n_boxes, s.query
    from_end = n_b - (n_s - q)
    obj_b: list[int] = base.roles["objects"]  # type: ignore[assignment]
    src_obj: int = source.roles["correct_object"]  # type: ignore[assignment]
    len_b, len_s = len(base.input_ids), len(source.input_ids)
    return {"ordinal_start": objects[q] if q < n_b else None,
            "ordinal_end": objects[from_end] if 0 <= from_end < n_b else None,
            "offset_start": objects[nearest(obj_b, src_obj)],
            "offset_end": objects[nearest([len_b - p for p in obj_b], len_s - src_obj)]}


def cross_length_pairs(bases: Sequence[Example], pool: Sequence[Example], rng: random.Random) -> list[Pair]:
    """A source with another box count for each base (drawn from `pool`); its target for the loader is the
    ordinal-from-start object where that exists, else the ordinal-from-end one (the hypotheses are scored apart)."""
    out = []
    for b in bases:
        n_b = b.context.n_boxes
        src = _draw_source(b, pool, lambda x: x.query is not None and (x.query < n_b or x.context.n_boxes - x.query <= n_b), rng)
        q = src.query
        out.append(Pair(b, src, b.context.objects[q if q < n_b else n_b - (src.context.n_boxes - q)]))
    return out
