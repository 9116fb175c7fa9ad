"""The boxes task: contexts, query prompts, the surface template, and the seeded generator."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Sequence

from etk.data.vocab import LETTERS


@dataclass(frozen=True)
class Template:
    """Surface form of a prompt. The default is the paper's:
    "The <o1> is in Box <L1>, the <o2> is in Box <L2>, ... . Box <Lq> contains the" -> " <oq>"."""

    first_det: str = "The"
    det: str = "the"
    relation: str = "is in"
    container: str = "Box"
    sep: str = ", "
    end: str = ". "
    query: str = "{container} {label} contains the"
    prefix: str = ""


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
        t = self.template
        text = t.prefix
        objs: list[Span] = []
        labs: list[Span] = []
        for k, (obj, lab) in enumerate(zip(self.context.objects, self.context.labels)):
            if k:
                text += t.sep
            text += (t.first_det if k == 0 else t.det) + " "
            objs.append(Span(len(text), len(text) + len(obj)))
            text += f"{obj} {t.relation} {t.container} "
            labs.append(Span(len(text), len(text) + len(lab)))
            text += lab
        text += t.end
        head, _, tail = t.query.partition("{label}")
        text += head.format(container=t.container)
        q = Span(len(text), len(text) + len(self.query_label))
        text += self.query_label + tail.format(container=t.container)
        return Rendered(text=text, objects=tuple(objs), labels=tuple(labs), query_label=q)


def query_examples(context: Context, template: Template = PAPER_TEMPLATE) -> list[Example]:
    """One query prompt per box, in box order (the paper's line order)."""
    return [Example(context, lab, template) for lab in context.labels]


def generate_contexts(
    n_contexts: int,
    n_boxes: int,
    objects: Sequence[str],
    labels: Sequence[str] = LETTERS,
    seed: int = 0,
    start_id: int = 0,
) -> list[Context]:
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


def generate_examples(
    n_examples: int,
    n_boxes: int,
    objects: Sequence[str],
    labels: Sequence[str] = LETTERS,
    seed: int = 0,
    template: Template = PAPER_TEMPLATE,
) -> list[Example]:
    """The first `n_examples` query lines of a generated dataset (each context yields n_boxes lines)."""
    n_contexts = -(-n_examples // n_boxes)
    contexts = generate_contexts(n_contexts, n_boxes, objects, labels, seed)
    return [ex for c in contexts for ex in query_examples(c, template)][:n_examples]
