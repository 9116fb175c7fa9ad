"""Counterfactual pair builders, one small function per method (SPEC §2.1, §3.1, §4.1).

Every builder is seeded through the `random.Random` it receives and returns plain `Example`s; tokenization and
role positions come later from `etk.data.roles`, so sources carry their own roles. The paper's 11 additional
positional desiderata are one table, `POSITIONAL_VARIANTS`: a rewrite of the source's template and a target rule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Sequence

from etk.data.vocab import LETTERS
from etk.errors import DataError
from etk.tasks.base import Pair
from etk.tasks.entity_tracking.boxes import Context, Example, Template


def _group_by_context(examples: Sequence[Example]) -> dict[Context, list[Example]]:
    """Examples by their context (the context itself, not its sample_id: datasets of several box counts reuse ids)."""
    groups: dict[Context, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.context, []).append(ex)
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
            raise DataError("clean path-patching prompts need a valid query")
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
    raise DataError(f"no valid source for base {base.render().text!r} in a pool of {len(pool)} prompts")


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


def _swap(text: str, old: str, new: str) -> str:
    """`text` with `old` replaced by `new`; an error if the template does not contain `old`."""
    if old not in text:
        raise DataError(f"this variant needs {old!r} in the template, got {text!r}")
    return text.replace(old, new)


def _edit_relation(t: Template, s: int, old: str, new: str) -> Template:
    """Segment s only: its relation words `old` become `new`."""
    return t.with_segment(s, t.segment_format(s).replace("{relation}", _swap(t.relation, old, new)))


def _text_before_first_segment(t: Template, text: str) -> Template:
    """`text` starts the context; the real first segment then takes the lowercase determiner."""
    return replace(t, prefix=t.prefix + text, first_det=t.det)


EXTRA_BOXES = "there are three additional boxes, Box PP, Box BB and Box AA, "


def _boxes_before_segment(t: Template, s: int) -> Template:
    """EXTRA_BOXES right before segment s (capitalised when it starts the context)."""
    if s == 0:
        return _text_before_first_segment(t, EXTRA_BOXES[0].upper() + EXTRA_BOXES[1:])
    return t.with_segment(s, EXTRA_BOXES + t.segment_format(s))


@dataclass(frozen=True)
class PositionalVariant:
    """A positional desideratum whose source is rewritten by `edit(template, s)` (s = the source's query index);
    target = the base object at index (s + shift) mod n_boxes."""

    edit: Callable[[Template, int], Template]
    shift: int = 0


POSITIONAL_VARIANTS: dict[str, PositionalVariant] = {
    "random_text_start": PositionalVariant(
        lambda t, s: _text_before_first_segment(t, "There are a bunch of boxes containing objects, ")),
    "random_text_end": PositionalVariant(
        lambda t, s: replace(t, end=", these are a bunch of boxes containing objects" + t.end)),
    "add_tokens_btw_box_and_obj": PositionalVariant(lambda t, s: _edit_relation(t, s, "is in", "is contained in the")),
    "add_seg_start": PositionalVariant(lambda t, s: _text_before_first_segment(t, "The apple is in Box O, ")),
    "add_seg_end": PositionalVariant(lambda t, s: replace(t, end=", the apple is in Box O" + t.end)),
    "add_box_before_correct_segment": PositionalVariant(_boxes_before_segment),
    "incorrect_segment": PositionalVariant(lambda t, s: t, shift=1),  # control: the target is the wrong box
    "altered_box_obj_order": PositionalVariant(lambda t, s: t.with_segment(s, t.query + " {obj}")),
    "altered_box_obj_association": PositionalVariant(lambda t, s: _edit_relation(t, s, "is in", "is not in")),
    "no_comma": PositionalVariant(lambda t, s: replace(t, sep=_swap(t.sep, ", ", " "))),
    "add_comma": PositionalVariant(lambda t, s: replace(t, segment=_swap(t.segment, "{obj} ", "{obj}, "))),
}


def positional_variant_pairs(
    name: str, bases: Sequence[Example], pool: Sequence[Example], rng: random.Random
) -> list[Pair]:
    """The positional pairs (same draws) with each source rewritten by variant `name` and its target rule."""
    variant = POSITIONAL_VARIANTS[name]
    out = []
    for p in positional_pairs(bases, pool, rng):
        s: int = p.source.query  # type: ignore[assignment]
        source = replace(p.source, template=variant.edit(p.source.template, s))
        out.append(Pair(p.base, source, p.base.context.objects[(s + variant.shift) % p.base.context.n_boxes]))
    return out


DESIDERATA: dict[str, Callable[..., list[Pair]]] = {
    "positional": positional_pairs,
    "object_value": object_value_pairs,
    "box_label_value": box_label_value_pairs,
    **{name: partial(positional_variant_pairs, name) for name in POSITIONAL_VARIANTS},
}
