"""Fine-tuning corpora: entity-tracking text disjoint from the evaluation distribution, and Goat-style arithmetic.

Each item is (prompt, answer); the loss is taken on the answer tokens only."""

from __future__ import annotations

import random
from dataclasses import dataclass

from etk.data.boxes import Template, generate_contexts, query_examples
from etk.data.vocab import LETTERS, filter_single_token, load_objects

# Surface forms for training. The paper's frame appears with a disjoint object list; the others change the
# container word, the relation and the query, so evaluation (paper frame + paper objects) measures tracking.
TRAIN_TEMPLATES: dict[str, Template] = {
    "box": Template(),
    "crate": Template(container="Crate", query="{container} {label} holds the"),
    "bin": Template(relation="is inside", container="Bin", query="{container} {label} has the"),
    "case": Template(relation="sits in", container="Case", query="Inside {container} {label} is the"),
}


@dataclass(frozen=True)
class TextItem:
    prompt: str
    answer: str  # appended after the prompt; the loss covers its tokens only


def boxes_items(n: int, tokenizer, seed: int, min_boxes: int = 2, max_boxes: int = 7,
                objects_file: str = "objects_train.csv", templates: tuple[str, ...] = tuple(TRAIN_TEMPLATES)) -> list[TextItem]:
    """`n` random entity-tracking prompts, 2-7 boxes, training objects only (disjoint from `objects.csv`)."""
    eval_objects = set(load_objects("objects.csv"))
    objects = [o for o in load_objects(objects_file) if o not in eval_objects]
    objects = filter_single_token(tokenizer, objects, max_boxes, "training objects")
    labels = filter_single_token(tokenizer, list(LETTERS), max_boxes, "labels")
    rng = random.Random(seed)
    items = []
    while len(items) < n:
        nb = rng.randint(min_boxes, max_boxes)
        ctx = generate_contexts(1, nb, objects, labels, seed=rng.randrange(2**31))[0]
        ex = rng.choice(query_examples(ctx, TRAIN_TEMPLATES[rng.choice(templates)]))
        items.append(TextItem(ex.render().text, " " + ex.answer))  # type: ignore[operator]
    return items


def arithmetic_items(n: int, seed: int, max_digits: int = 4, ops: tuple[str, ...] = ("+", "-", "*")) -> list[TextItem]:
    """Goat-style synthetic arithmetic: "<a> <op> <b> =" -> " <result>" (multiplication kept to <= 3x2 digits)."""
    rng = random.Random(seed)
    items = []

    def num(d: int) -> int:
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    while len(items) < n:
        op = rng.choice(ops)
        if op == "*":
            a, b = num(rng.randint(1, 3)), num(rng.randint(1, 2))
            c = a * b
        else:
            a, b = num(rng.randint(1, max_digits)), num(rng.randint(1, max_digits))
            c = a + b if op == "+" else a - b
        items.append(TextItem(f"{a} {op} {b} =", f" {c}"))
    return items
