"""Config checks that run before any model is loaded: a bad value fails at once with the key, the value and the fix."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from etk.errors import ConfigError
from etk.tasks import task_of

POSITIVE = frozenset({  # counts and sizes that must be integers >= 1 wherever they appear
    "n_examples", "batch_size", "n_prompts", "n_search", "n_heldout", "repeats", "attribution_batch_size",
    "ablations_per_forward", "vital_rows_per_forward", "rows_per_forward", "chunk_rows", "suffix_chunk_rows",
    "n_train", "n_eval", "n_test", "epochs", "val_every", "steps", "grid_points", "verify_prompts",
})
NON_NEGATIVE = frozenset({"n_random", "n_verify", "n_bootstrap", "grow_rounds", "prune_rounds", "refine_points",
                          "warmup_steps", "checkpoint_every", "start_layers_every"})


def leaves(node: Any, path: str):
    """(dotted path, value) of every leaf; lists are leaves."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{path}.{k}")
    else:
        yield path, node


def _int(path: str, v: Any, low: int) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{path} = {v!r}: must be an integer >= {low}; set it on the command line, e.g. {path}={max(low, 1)}")


SECTIONS = ("data", "method", "ablation", "dcm", "train", "eval", "finetune_data")  # where counts and sizes live


def section_leaves(cfg: DictConfig):
    """(dotted path, leaf name, value) of every leaf of the config's sections (lists are leaves)."""
    for section in SECTIONS:
        node = cfg.get(section)
        if isinstance(node, DictConfig):
            for path, v in leaves(OmegaConf.to_container(node, resolve=True), section):
                yield path, path.rsplit(".", 1)[-1], v


def validate(cfg: DictConfig) -> None:
    """Check the task, counts, sizes, the task's own settings (box counts, data files) and the circuit file of a
    composed config (raises ConfigError)."""
    task = task_of(cfg)
    for path, leaf, v in section_leaves(cfg):
        if isinstance(v, list):
            continue
        if leaf in POSITIVE:
            _int(path, v, 1)
        elif leaf in NON_NEGATIVE:
            _int(path, v, 0)
    d = cfg.get("data")
    if isinstance(d, DictConfig) and d.get("padding_side") not in (None, "left", "right"):
        raise ConfigError(f"data.padding_side = {d.padding_side!r}: must be 'left' or 'right'")
    task.check(cfg)
    m = cfg.get("method")
    if isinstance(m, DictConfig):
        if m.get("target") is not None and not 0 < float(m.target) <= 1.5:
            raise ConfigError(f"method.target = {m.target}: a faithfulness target in (0, 1.5], e.g. method.target=0.9")
        for x in m.get("fractions") or []:
            if not 0 < float(x) <= 1:
                raise ConfigError(f"method.fractions: {x} is not in (0, 1]; fractions of the model's heads, e.g. [0.01, 0.1, 1.0]")
    from etk.circuits import circuit_spec

    spec = circuit_spec(cfg)
    if spec:
        from etk.circuits import load_circuit

        load_circuit(spec)  # a missing, malformed or unknown-key circuit file fails here, before any model
