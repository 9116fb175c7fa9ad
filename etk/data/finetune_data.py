"""Fine-tuning corpora: entity-tracking text disjoint from the evaluation distribution, entity tracking in other
surface forms that never use the box template (`relations`), and Goat-style arithmetic.

Each item is (prompt, answer); the loss is taken on the answer tokens only."""

from __future__ import annotations

import random
from dataclasses import dataclass

from etk.data.vocab import LETTERS, filter_single_token, load_objects, load_words
from etk.errors import ConfigError
from etk.tasks.entity_tracking.boxes import Template, generate_contexts, query_examples

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


# Entity tracking without the box template: people instead of one-letter box labels, other relations, other query
# shapes, and no "Box" / "contains" anywhere. Each binds an object to a key (a name) in one clause per entity and
# asks for the object of one key.
RELATION_FRAMES: dict[str, Template] = {
    # object first, then its key, as in the box template ("The cup belongs to Anna, ... . Anna owns the" -> " cup")
    "owners": Template(segment="{det} {obj} {relation} {label}", relation="belongs to", query="{label} owns the"),
    # key first ("Anna carries the cup, ... . Anna carries the" -> " cup")
    "carriers": Template(segment="{label} {relation} the {obj}", relation="carries", first_det="", det="",
                         query="{label} carries the"),
    # key first, another verb and separator ("Anna received the cup; ... . Anna received the" -> " cup")
    "gifts": Template(segment="{label} {relation} the {obj}", relation="received", first_det="", det="", sep="; ",
                      query="{label} received the"),
}
BOX_TEMPLATE_WORDS = ("Box", "contains")  # never emitted by the relation frames


def relation_items(n: int, tokenizer, seed: int, frames: tuple[str, ...] = tuple(RELATION_FRAMES), min_entities: int = 2,
                   max_entities: int = 7, objects_file: str = "objects_train.csv", names_file: str = "names.csv",
                   arithmetic_fraction: float = 0.0) -> list[TextItem]:
    """`n` entity-tracking prompts in the relation frames (names as keys, training objects only), optionally mixed
    with a fraction of arithmetic items."""
    unknown = set(frames) - set(RELATION_FRAMES)
    if unknown:
        raise ConfigError(f"unknown relation frames {sorted(unknown)}; choose from {sorted(RELATION_FRAMES)}")
    eval_objects = set(load_objects("objects.csv"))
    objects = filter_single_token(tokenizer, [o for o in load_objects(objects_file) if o not in eval_objects],
                                  max_entities, "training objects")
    names = filter_single_token(tokenizer, load_words(names_file, "name"), max_entities, "names")
    rng = random.Random(seed)
    n_arith = round(n * arithmetic_fraction)
    items = arithmetic_items(n_arith, seed + 1) if n_arith else []
    while len(items) < n:
        k = rng.randint(min_entities, max_entities)
        ctx = generate_contexts(1, k, objects, names, seed=rng.randrange(2**31))[0]
        ex = rng.choice(query_examples(ctx, RELATION_FRAMES[rng.choice(frames)]))
        items.append(TextItem(ex.render().text.replace("  ", " ").lstrip(), " " + ex.answer))  # type: ignore[operator]
    rng.shuffle(items)
    return items
