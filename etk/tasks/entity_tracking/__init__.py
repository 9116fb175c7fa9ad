"""Entity tracking in boxes, the paper's task (SPEC §1): "The apple is in Box F, the computer is in Box Q, ... Box Q
contains the" -> " computer". Its circuit (SPEC §2): Value Fetcher heads at `last` (direct effect) <- Position
Transmitter heads at `last` (their q) <- Position Detector heads at the query label (their v) <- Structure Reader
heads at the queried box's label in the context (their v; the corrupt position is a random box label of the corrupt
prompt)."""

from __future__ import annotations

import random
from typing import Sequence

from omegaconf import DictConfig, open_dict

from etk.errors import ConfigError
from etk.tasks.base import Desideratum, Group, Pair, Stage, Task
from etk.tasks.entity_tracking.boxes import Example, generate_contexts
from etk.tasks.entity_tracking.data import check_box_count, make_template, task_examples, task_vocab
from etk.tasks.entity_tracking.desiderata import desideratum_pairs, split_by_context
from etk.tasks.entity_tracking.encode import (
    MAX_BOXES,
    ROLES,
    SCALAR_ROLES,
    TEMPLATE_ROLES,
    VECTOR_ROLES,
    encode_example,
)
from etk.tasks.entity_tracking.pairs import POSITIONAL_VARIANTS, mean_ablation_examples, path_patching_pairs
from etk.tasks.entity_tracking.hypotheses import HYPOTHESES, cross_length_pairs, hypothesis_targets


class EntityTracking(Task):
    name = "entity_tracking"
    description = "entity tracking in boxes: 'The apple is in Box F, ... Box Q contains the' -> the object"
    roles = ROLES
    scalar_roles = SCALAR_ROLES
    collapsed_roles = SCALAR_ROLES + VECTOR_ROLES + TEMPLATE_ROLES  # model diffing's row order
    groups = (
        Group("value_fetcher", "last", "VF", "Value Fetcher"),
        Group("pos_transmitter", "last", "PT", "Position Transmitter"),
        Group("pos_detector", "query_label", "PD", "Position Detector"),
        Group("struct_reader", "prev_query_label", "SR", "Structure Reader"),
    )
    stages = (
        Stage("value_fetcher", None),
        Stage("pos_transmitter", "q"),
        Stage("pos_detector", "v"),
        Stage("struct_reader", "v", "labels[source_box]"),
    )
    knockout_edges = ("last->correct_object", "last->query_label", "last->random", "query_label->prev_query_label",
                      "query_label->random")
    desiderata = (Desideratum("object_value", "object value"), Desideratum("positional", "position"),
                  Desideratum("box_label_value", "box-label value"),
                  *(Desideratum(n, n.replace("_", " ")) for n in POSITIONAL_VARIANTS))
    schedule = {  # the paper's Llama-7B schedule (1024 heads), SPEC §2.4-2.5
        "receivers_top_k": {"value_fetcher": 20, "pos_transmitter": 5, "pos_detector": 10},
        "candidates_top_k": {"value_fetcher": 58, "pos_transmitter": 10, "pos_detector": 25, "struct_reader": 5},
    }
    pruning_order_ = ("struct_reader", "pos_transmitter", "pos_detector", "value_fetcher")  # the paper's (SPEC §3.4)
    # CMAP's head choice (SPEC §6.1): DCM selections for VF (object value), PT and PD (position); SR keeps all heads
    cmap_choice = (("value_fetcher", "object"), ("pos_transmitter", "position"), ("pos_detector", "position"))
    study_desiderata = ("object", "position", "label")  # desideratum config files the study's DCM step trains
    study_ap_desiderata = ("object", "position")
    hypotheses_desiderata = ("position",)
    hypotheses = HYPOTHESES
    title = "Entity-tracking study"
    skill = "tracking"
    vital_phrase = "the paper's three positions (last, query label, the queried box's label)"

    def prompt_meta(self, data_cfg) -> dict:
        return {"n_boxes": int(data_cfg.n_boxes)}

    def prompts_phrase(self, data_cfg) -> str:
        return f"{int(data_cfg.n_boxes)}-box prompts"

    def accuracy_phrase(self, data_cfg) -> str:
        return f"{int(data_cfg.n_boxes)}-box accuracy"

    def prompts_description(self, data_cfg) -> str:
        return f"{int(data_cfg.n_boxes)}-box prompts, paper template, objects from `{data_cfg.objects}`."

    def examples(self, data_cfg, tokenizer) -> list[Example]:
        return task_examples(data_cfg, tokenizer)

    def text(self, example: Example) -> str:
        return example.render().text

    def encode(self, tokenizer, example: Example, answer: str | None = None):
        return encode_example(tokenizer, example, answer)

    def path_patching_pairs(self, examples: Sequence[Example], rng: random.Random) -> list[Pair]:
        return path_patching_pairs(examples, rng)

    def ablation_examples(self, cfg, tokenizer) -> list[Example]:
        """One prompt per generated context with a random query letter (SPEC §3.1)."""
        d = cfg.data
        objects, labels = task_vocab(tokenizer, d.n_boxes, d.get("objects", "objects.csv"))
        contexts = generate_contexts(int(cfg.ablation.n_prompts), d.n_boxes, objects, labels, d.seed)
        return mean_ablation_examples(contexts, random.Random(int(cfg.ablation.seed)), make_template(d.get("template")))

    def desideratum_pairs(self, name: str, bases: Sequence[Example], seed: int, legacy: bool = False) -> list[Pair]:
        return desideratum_pairs(name, bases, seed, legacy)

    def hypothesis_targets(self, pair: Pair, base, source) -> dict[str, str | None]:
        return hypothesis_targets(pair, base, source)

    def cross_length_pairs(self, bases: Sequence[Example], pool: Sequence[Example], rng: random.Random) -> list[Pair]:
        return cross_length_pairs(bases, pool, rng)

    def unit(self, data_cfg) -> int:
        return int(data_cfg.n_boxes)

    def split(self, examples: Sequence[Example], sizes: Sequence[int]) -> list[list[Example]]:
        return split_by_context(examples, sizes)

    def eval_sets(self, data_cfg, method_cfg):
        """One set per box count of `method.box_counts` (default: data.n_boxes)."""
        out = []
        for n in list(method_cfg.get("box_counts") or [data_cfg.n_boxes]):
            d = data_cfg.copy()
            with open_dict(d):
                d.n_boxes = int(n)
            out.append(({"n_boxes": int(n)}, d))
        return out

    def check(self, cfg) -> None:
        """Box counts within 2..26 and the user's data files readable, before any model loads."""
        from etk.validate import section_leaves

        for path, leaf, v in section_leaves(cfg):
            if leaf in ("n_boxes", "max_boxes", "max_entities") and not isinstance(v, list):
                _boxes(path, v)
            elif leaf == "box_counts" and isinstance(v, list):
                for i, b in enumerate(v):
                    _boxes(f"{path}[{i}]", b)
        d = cfg.get("data")
        if isinstance(d, DictConfig):
            _data_files(d)
            _template(d)


def _boxes(path: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= MAX_BOXES:
        raise ConfigError(f"{path} = {v!r}: a prompt needs between 2 and {MAX_BOXES} boxes (one-letter labels A-Z); "
                          f"e.g. {path}=7 (the paper's)")


def _template(d: DictConfig) -> None:
    """`data.template` builds a Template (its segment has {obj} and {label} once, its query {label} once)."""
    spec = d.get("template")
    if not spec:
        return
    from omegaconf import OmegaConf

    try:
        make_template(OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.template: {e}. The segment needs {{obj}} and {{label}} once each and the query "
                          "{label} once (the position roles are read from them), e.g. "
                          "data.template.query='{container} {label} holds the'; fields: "
                          "first_det, det, relation, container, sep, end, query, prefix, segment, overrides") from None


def _data_files(d: DictConfig) -> None:
    """The user's files named by `data.path` / `data.objects` exist and parse (before any model loads)."""
    from pathlib import Path

    if d.get("path"):
        from etk.tasks.entity_tracking.jsonl import read_jsonl_lines

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


TASK = EntityTracking()
