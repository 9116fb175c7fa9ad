"""Small shared helpers for tests."""

from etk.data.boxes import generate_examples
from etk.data.datasets import pad_id, task_vocab
from etk.data.roles import collate, encode_example


def batch_of(tok, n=8, n_boxes=3, seed=0, padding_side="right", examples=None):
    if examples is None:
        objects, labels = task_vocab(tok, n_boxes)
        examples = generate_examples(n, n_boxes, objects, labels, seed)
    enc = [encode_example(tok, ex) for ex in examples]
    return collate(enc, pad_id(tok), padding_side), examples


def mixed_length_examples(tok, n=8, seed=0):
    """Prompts of different lengths (2..4 boxes) so padding is exercised."""
    out = []
    for nb in (2, 3, 4):
        objects, labels = task_vocab(tok, nb)
        out += generate_examples(n // 3 + 1, nb, objects, labels, seed + nb)
    return out[:n]
