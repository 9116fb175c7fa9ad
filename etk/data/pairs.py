"""Counterfactual pair builders, one small function per method (SPEC §2.1, §3.1, §4.1).

Every builder is seeded through the `random.Random` it receives and returns plain `Example`s; tokenization and
role positions come later from `etk.data.roles`, so sources carry their own roles.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from etk.data.boxes import Context, Example
from etk.data.vocab import LETTERS


@dataclass(frozen=True)
class Pair:
    """A base prompt, a source prompt, and the target word expected when the source's information is patched in.

    `source_box` is the box index of the source used by the Structure-Reader stage of path patching
    (a random box-label position of the corrupt prompt)."""

    base: Example
    source: Example
    target: str
    source_box: int = -1


def _group_by_context(examples: Sequence[Example]) -> dict[int, list[Example]]:
    groups: dict[int, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.context.sample_id, []).append(ex)
    return groups


def path_patching_pairs(examples: Sequence[Example], rng: random.Random) -> list[Pair]:
    """Clean/corrupt pairs (SPEC §2.1): for clean line (context i, query j) the corrupt prompt is the line with query
    (j+1) mod n of a uniformly drawn context among those present, with its query label replaced by a random letter.
    Target = the clean answer."""
    groups = _group_by_context(examples)
    ids = list(groups)
    pairs = []
    for ex in examples:
        if ex.query is None:
            raise ValueError("clean path-patching prompts need a valid query")
        g = groups[rng.choice(ids)]
        n = g[0].context.n_boxes
        j = (ex.query + 1) % n
        corrupt = Example(g[0].context, g[0].context.labels[j], ex.template).with_query_label(rng.choice(LETTERS))
        pairs.append(Pair(ex, corrupt, ex.answer, source_box=rng.randrange(n)))  # type: ignore[arg-type]
    return pairs


def mean_ablation_examples(contexts: Sequence[Context], rng: random.Random, template=None) -> list[Example]:
    """One prompt per context with a random query letter (SPEC §3.1): the data whose activations are averaged."""
    kw = {} if template is None else {"template": template}
    return [Example(c, rng.choice(LETTERS), **kw) for c in contexts]


def _draw_source(base: Example, pool: Sequence[Example], ok: Callable[[Example], bool], rng: random.Random) -> Example:
    for _ in range(10_000):
        src = rng.choice(pool)
        if ok(src):
            return src
    raise ValueError(f"no valid source for base {base.render().text!r} in a pool of {len(pool)} prompts")


def positional_pairs(bases: Sequence[Example], pool: Sequence[Example], rng: random.Random, legacy: bool = False) -> list[Pair]:
    """Positional desideratum: source query index s != base query index; target = base object at index s.

    `legacy=True` emulates [BUG-pos] (the paper's base index is always 0, so the condition is only s != 0)."""
    out = []
    for b in bases:
        forbidden = 0 if legacy else b.query
        s = _draw_source(b, pool, lambda x: x.query is not None and x.query != forbidden and x.query < b.context.n_boxes, rng)
        out.append(Pair(b, s, b.context.objects[s.query]))  # type: ignore[index]
    return out


def object_value_pairs(bases: Sequence[Example], pool: Sequence[Example], rng: random.Random) -> list[Pair]:
    """Object-value desideratum: sampled as positional; target = the source's own answer."""
    out = []
    for b in bases:
        s = _draw_source(b, pool, lambda x: x.query is not None and x.query != b.query, rng)
        out.append(Pair(b, s, s.answer))  # type: ignore[arg-type]
    return out


def box_label_value_pairs(bases: Sequence[Example], pool: Sequence[Example], rng: random.Random) -> list[Pair]:
    """Box-label-value desideratum ([BUG-label] fixed): the source's query label is another label of the base
    context; target = the base object in the box with that label."""
    out = []
    for b in bases:
        labels = set(b.context.labels) - {b.query_label}
        s = _draw_source(b, pool, lambda x: x.query_label in labels, rng)
        out.append(Pair(b, s, b.context.objects[b.context.labels.index(s.query_label)]))
    return out


DESIDERATA: dict[str, Callable[..., list[Pair]]] = {
    "positional": positional_pairs,
    "object_value": object_value_pairs,
    "box_label_value": box_label_value_pairs,
}
