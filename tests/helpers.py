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


def planted_model(tok, head=2, mechanism="last_head"):
    """A tiny model with a planted one-head mechanism (see etk.models.tiny.planted_llama): with one box it answers
    correctly, and the answer rests on head (1, head) at `last` (plus, for `object_relay`, head (0, 1) at the
    correct object's position)."""
    from etk.models.tiny import planted_llama

    return planted_llama(tok, mechanism, head)


def compose_cfg(primary: str, run_dir, overrides: list[str]):
    """Compose a primary config with a run directory, registered as the current Hydra config (so
    `${hydra:...}` and `output_dir()` resolve as under the real CLI)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from tests.conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(primary, overrides=overrides + [f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg
