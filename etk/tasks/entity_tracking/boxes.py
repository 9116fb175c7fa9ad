"""The boxes task: contexts, query prompts, the surface template, and the seeded generator."""

from __future__ import annotations

import random
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Sequence

from etk.data.vocab import LETTERS

SEGMENT_FIELDS = frozenset({"det", "obj", "relation", "container", "label"})
QUERY_FIELDS = frozenset({"container", "label"})


def _placeholders(fmt: str) -> list[str]:
    """The placeholder names of a format string, in order (only plain `{name}` fields are allowed)."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(fmt):
        if name is not None:
            if spec or conversion:
                raise ValueError(f"format {fmt!r}: only plain {{name}} placeholders are supported")
            names.append(name)
    return names


def _check_format(fmt: str, allowed: frozenset[str], once: tuple[str, ...]) -> None:
    names = _placeholders(fmt)
    if unknown := set(names) - allowed:
        raise ValueError(f"format {fmt!r}: unknown placeholders {sorted(unknown)}; allowed: {sorted(allowed)}")
    for name in once:
        if names.count(name) != 1:
            raise ValueError(f"format {fmt!r} must contain {{{name}}} exactly once (it carries a position role)")


def _fill(fmt: str, values: Mapping[str, str], start: int, literal_role: str,
          pieces: list[tuple[int, int, str]]) -> tuple[str, dict[str, Span]]:
    """Format `fmt` with `values`; return the character span of each placeholder, offset by `start`, and append
    every non-empty piece (start, end, template role) to `pieces`: placeholders under their field name, literal
    text under `literal_role`."""
    text, spans = "", {}
    for literal, name, _, _ in string.Formatter().parse(fmt):
        if literal:
            pieces.append((start + len(text), start + len(text) + len(literal), literal_role))
        text += literal
        if name is not None:
            spans[name] = Span(start + len(text), start + len(text) + len(values[name]))
            if values[name]:
                pieces.append((spans[name].start, spans[name].end, name))
            text += values[name]
    return text, spans


@dataclass(frozen=True)
class Template:
    """Surface form of a prompt. The default is the paper's:
    "The <o1> is in Box <L1>, the <o2> is in Box <L2>, ... . Box <Lq> contains the" -> " <oq>".

    The text is `prefix`, the segments joined by `sep`, `end`, then `query`. Segment k is rendered from
    `segment` (or from its entry in `overrides`, pairs (k, format) given as pairs or a mapping), with the
    placeholders {det} (`first_det` for k = 0, else `det`), {obj}, {relation}, {container}, {label}."""

    first_det: str = "The"
    det: str = "the"
    relation: str = "is in"
    container: str = "Box"
    sep: str = ", "
    end: str = ". "
    query: str = "{container} {label} contains the"
    prefix: str = ""
    segment: str = "{det} {obj} {relation} {container} {label}"
    overrides: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        items = self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides
        pairs = tuple(sorted((int(k), str(fmt)) for k, fmt in items))  # canonical, hashable (also from Hydra lists)
        if len({k for k, _ in pairs}) != len(pairs) or any(k < 0 for k, _ in pairs):
            raise ValueError(f"segment overrides need distinct non-negative indices, got {pairs}")
        object.__setattr__(self, "overrides", pairs)
        for fmt in (self.segment, *(f for _, f in pairs)):
            _check_format(fmt, SEGMENT_FIELDS, once=("obj", "label"))
        _check_format(self.query, QUERY_FIELDS, once=("label",))

    def segment_format(self, k: int) -> str:
        """The format string of segment k."""
        return dict(self.overrides).get(k, self.segment)

    def with_segment(self, k: int, fmt: str) -> "Template":
        """A copy whose segment k is rendered from `fmt` (replacing any earlier override of k)."""
        return replace(self, overrides=tuple({**dict(self.overrides), k: fmt}.items()))


PAPER_TEMPLATE = Template()


@dataclass(frozen=True)
class Context:
    """One world state: objects[k] is in box labels[k]."""

    sample_id: int
    objects: tuple[str, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.objects) != len(self.labels):
            raise ValueError("a context needs as many objects as labels")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"context {self.sample_id}: repeated box labels {self.labels} make queries ambiguous")
        if len(set(self.objects)) != len(self.objects):
            raise ValueError(f"context {self.sample_id}: repeated objects {self.objects}")

    @property
    def n_boxes(self) -> int:
        return len(self.objects)


@dataclass(frozen=True)
class Span:
    """Character span [start, end) of a word in the rendered prompt."""

    start: int
    end: int


@dataclass(frozen=True)
class Rendered:
    """A prompt string plus the character spans of every word that carries a position role."""

    text: str
    objects: tuple[Span, ...]
    labels: tuple[Span, ...]
    query_label: Span
    pieces: tuple[tuple[int, int, str], ...] = ()  # (start, end, template role) covering the text, in order


@dataclass(frozen=True)
class Example:
    """A query prompt over a context. `query_label` may name no box (corrupt/ablation prompts): then `query` is None."""

    context: Context
    query_label: str
    template: Template = field(default=PAPER_TEMPLATE)

    @property
    def query(self) -> int | None:
        """Index of the queried box in the context, or None if the label is not in the context."""
        try:
            return self.context.labels.index(self.query_label)
        except ValueError:
            return None

    @property
    def answer(self) -> str | None:
        q = self.query
        return None if q is None else self.context.objects[q]

    def with_query_label(self, label: str) -> "Example":
        return replace(self, query_label=label)

    def render(self) -> Rendered:
        """The prompt text and the spans of every object, label and the query label, taken while formatting."""
        t = self.template
        n = self.context.n_boxes
        if any(k >= n for k, _ in t.overrides):
            raise ValueError(f"template overrides segments {[k for k, _ in t.overrides]} of a {n}-box context")
        pieces: list[tuple[int, int, str]] = []

        def literal(piece: str, role: str) -> None:
            nonlocal text
            if piece:
                pieces.append((len(text), len(text) + len(piece), role))
            text += piece

        text = ""
        literal(t.prefix, "prefix")
        objs: list[Span] = []
        labs: list[Span] = []
        for k, (obj, lab) in enumerate(zip(self.context.objects, self.context.labels)):
            if k:
                literal(t.sep, "sep")
            values = {"det": t.first_det if k == 0 else t.det, "obj": obj, "relation": t.relation,
                      "container": t.container, "label": lab}
            segment, spans = _fill(t.segment_format(k), values, len(text), "segment_text", pieces)
            text += segment
            objs.append(spans["obj"])
            labs.append(spans["label"])
        literal(t.end, "end")
        qpieces: list[tuple[int, int, str]] = []
        query, spans = _fill(t.query, {"container": t.container, "label": self.query_label}, len(text), "query_text",
                             qpieces)
        pieces += [(a, b, "query_container" if r == "container" else r) for a, b, r in qpieces]
        return Rendered(text=text + query, objects=tuple(objs), labels=tuple(labs), query_label=spans["label"],
                        pieces=tuple(pieces))


def query_examples(context: Context, template: Template = PAPER_TEMPLATE) -> list[Example]:
    """One query prompt per box, in box order (the paper's line order)."""
    return [Example(context, lab, template) for lab in context.labels]


def generate_contexts(n_contexts: int, n_boxes: int, objects: Sequence[str], labels: Sequence[str] = LETTERS,
                      seed: int = 0, start_id: int = 0) -> list[Context]:
    """Seeded random contexts with distinct objects and distinct one-letter labels."""
    if not 1 <= n_boxes <= 26:
        raise ValueError(f"n_boxes must be in 1..26, got {n_boxes}")
    if len(set(objects)) < n_boxes:
        raise ValueError(f"need at least {n_boxes} distinct objects, got {len(set(objects))}")
    if len(set(labels)) < n_boxes:
        raise ValueError(f"need at least {n_boxes} distinct labels, got {len(set(labels))}")
    rng = random.Random(seed)
    objects, labels = sorted(set(objects), key=list(objects).index), sorted(set(labels), key=list(labels).index)
    return [
        Context(start_id + i, tuple(rng.sample(objects, n_boxes)), tuple(rng.sample(labels, n_boxes)))
        for i in range(n_contexts)
    ]


def generate_examples(n_examples: int, n_boxes: int, objects: Sequence[str], labels: Sequence[str] = LETTERS,
                      seed: int = 0, template: Template = PAPER_TEMPLATE) -> list[Example]:
    """The first `n_examples` query lines of a generated dataset (each context yields n_boxes lines)."""
    n_contexts = -(-n_examples // n_boxes)
    contexts = generate_contexts(n_contexts, n_boxes, objects, labels, seed)
    return [ex for c in contexts for ex in query_examples(c, template)][:n_examples]
