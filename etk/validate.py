"""Config checks that run before any model is loaded: a bad value fails at once with the key, the value and the fix."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from etk.data.roles import MAX_BOXES
from etk.errors import ConfigError
from etk.tasks import check_task

POSITIVE = frozenset({  # counts and sizes that must be integers >= 1 wherever they appear
    "n_examples", "batch_size", "n_prompts", "n_search", "n_heldout", "repeats", "attribution_batch_size",
    "ablations_per_forward", "vital_rows_per_forward", "rows_per_forward", "chunk_rows", "suffix_chunk_rows",
    "n_train", "n_eval", "n_test", "epochs", "val_every", "steps", "grid_points", "verify_prompts",
})
NON_NEGATIVE = frozenset({"n_random", "n_verify", "n_bootstrap", "grow_rounds", "prune_rounds", "refine_points",
                          "warmup_steps", "checkpoint_every", "start_layers_every"})


def _walk(node: Any, path: str):
    """(dotted path, value) of every leaf; lists are leaves."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    else:
        yield path, node


def _int(path: str, v: Any, low: int) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{path} = {v!r}: must be an integer >= {low}; set it on the command line, e.g. {path}={max(low, 1)}")


def _boxes(path: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= MAX_BOXES:
        raise ConfigError(f"{path} = {v!r}: a prompt needs between 2 and {MAX_BOXES} boxes (one-letter labels A-Z); "
                          f"e.g. {path}=7 (the paper's)")


def _data_files(d: DictConfig) -> None:
    """The user's files named by `data.path` / `data.objects` exist and parse (before any model loads)."""
    from pathlib import Path

    if d.get("path"):
        from etk.data.datasets import check_box_count
        from etk.data.jsonl import read_jsonl_lines

        if not Path(str(d.path)).expanduser().is_file():
            raise ConfigError(f"data.path={d.path!r} does not exist; pass a paper-format dataset.jsonl (one JSON object a "
                              f"line with a 'sentence' field), e.g. data.path=/data/box_datasets/3/dataset.jsonl data.n_boxes=3")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported when the prompts are built
            lines = read_jsonl_lines(str(d.path))
        check_box_count(d.path, lines, int(d.n_boxes), ConfigError)
    if d.get("objects"):
        from etk.data.vocab import load_objects

        load_objects(str(d.objects))  # a missing or malformed objects file fails here


def validate(cfg: DictConfig) -> None:
    """Check the task, counts, sizes, box counts and the circuit file of a composed config (raises ConfigError)."""
    task = cfg.get("task")
    if task is not None:
        check_task(str(task.get("name") if isinstance(task, DictConfig) else task))
    for section in ("data", "method", "ablation", "dcm", "train", "eval", "finetune_data"):
        node = cfg.get(section)
        if not isinstance(node, DictConfig):
            continue
        for path, v in _walk(OmegaConf.to_container(node, resolve=True), section):
            leaf = path.rsplit(".", 1)[-1]
            if isinstance(v, list) and leaf != "box_counts":
                continue
            if leaf in POSITIVE:
                _int(path, v, 1)
            elif leaf in NON_NEGATIVE:
                _int(path, v, 0)
            elif leaf in ("n_boxes", "max_boxes", "max_entities"):
                _boxes(path, v)
            elif leaf == "box_counts" and isinstance(v, list):
                for i, b in enumerate(v):
                    _boxes(f"{path}[{i}]", b)
    d = cfg.get("data")
    if isinstance(d, DictConfig) and d.get("padding_side") not in (None, "left", "right"):
        raise ConfigError(f"data.padding_side = {d.padding_side!r}: must be 'left' or 'right'")
    if isinstance(d, DictConfig):
        _data_files(d)
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
