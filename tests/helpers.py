"""Small shared helpers for tests (imported by test modules; no test module imports from another)."""

import torch

from etk.data.datasets import pad_id
from etk.data.roles import PromptBatch, collate
from etk.interventions.components import HeadId
from etk.tasks import task_named
from etk.tasks.entity_tracking.boxes import generate_examples
from etk.tasks.entity_tracking.data import task_vocab
from etk.tasks.entity_tracking.encode import encode_example

# A small model config for modules that load their own model (DCM).
TINY_CFG = {"name": "tiny", "source": "tiny", "tiny": {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2}, "dtype": "float32"}

# Receiver heads for the path-patching stages of the 4-layer tiny models.
RECV = [HeadId(3, 1), HeadId(2, 0), HeadId(2, 3), HeadId(1, 2)]


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


def compose_run(tmp_path, overrides):
    """`run_patching.py <overrides>` in-process: composed with `tmp_path` as the run directory, then run."""
    from etk.cli import run_method as run

    return run(compose_cfg("patching", tmp_path, overrides))


# mean ablation -------------------------------------------------------------------------------------------------------

def means_of(model, batch: PromptBatch) -> torch.Tensor:
    """[L, T, H, D] per-position mean of every head's output (o_proj input) over the batch (pads included)."""
    from etk.interventions.hooks import Capture, hooked
    from etk.models.arch import LlamaFamily
    from etk.models.forward import last_logits

    L = LlamaFamily(model).dims.n_layers
    with hooked(model, captures=[Capture("z", j) for j in range(L)]) as c:
        last_logits(model, batch)
    return torch.stack([c[("z", j)].mean(0) for j in range(L)])  # [L, T, H, D]


def run_ablations(model, batch, means, ablations):
    """[K, N, V] last-token logits of K ablations, all in one forward."""
    from etk.interventions.hooks import hooked
    from etk.methods.mean_ablation.ablation import ablation_patches, keep_rows, repeat_batch
    from etk.models.forward import last_logits

    rows = repeat_batch(batch, len(ablations))
    with hooked(model, patches=ablation_patches(means, keep_rows(ablations, batch))):
        logits = last_logits(model, rows)
    return logits.view(len(ablations), len(batch), -1)


def evaluator(model, batch, means):
    """An `evaluate(ablations) -> [K, N] correctness` for the circuit methods, on one batch."""
    def evaluate(ablations):
        return (run_ablations(model, batch, means, ablations).argmax(-1) == batch.answer).float()
    return evaluate


# path patching -------------------------------------------------------------------------------------------------------

def pp_batch(tok, n=10, n_boxes=4, side="right", seed=0, mixed=False):
    """One batch of clean/corrupt path-patching pairs."""
    from etk.methods.path_patching.stages import pp_loader

    if mixed:
        exs = mixed_length_examples(tok, n=n, seed=seed)
    else:
        objects, labels = task_vocab(tok, n_boxes)
        exs = generate_examples(n, n_boxes, objects, labels, seed)
    return next(iter(pp_loader(task_named("entity_tracking"), tok, exs, seed=seed, batch_size=n, padding_side=side)))


def assert_scores_close(fast: torch.Tensor, naive: torch.Tensor, floor: float = 1e-7) -> None:
    """fast == naive (path-patching score maps) to a tolerance relative to the largest score: 1e-4 of each entry
    plus 1e-3 of the largest one, never below 10x `floor` (the fp32 noise of a relative-probability score, ~1e-7).
    The scores must stand 100x above that floor, or the comparison would only compare noise."""
    fast, naive = fast.detach().cpu(), naive.detach().cpu()
    scale = float(naive.abs().max())
    assert scale > 100 * floor, f"largest score {scale:.2e} is within 100x of the noise floor {floor:.0e}"
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=max(1e-3 * scale, 10 * floor))


# DCM -----------------------------------------------------------------------------------------------------------------

def pair_batch(tok, name="object_value", n=12, n_boxes=3, seed=0):
    """One batch of (base, source) pairs of a desideratum."""
    from etk.data.datasets import pair_loader
    from etk.tasks.entity_tracking.desiderata import desideratum_pairs

    objects, labels = task_vocab(tok, n_boxes)
    exs = generate_examples(n, n_boxes, objects, labels, seed)
    return next(iter(pair_loader(task_named("entity_tracking"), tok, desideratum_pairs(name, exs, seed), n)))
