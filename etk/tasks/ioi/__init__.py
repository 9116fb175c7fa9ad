"""Indirect object identification (Wang et al. 2022, arXiv 2211.00593): "When Mary and John went to the store, John
gave a drink to" -> " Mary". The circuit's stage graph: name movers at END (`last`; direct effect on the logits) <-
S-inhibition heads at END (their q) <- induction and duplicate-token heads at S2 (their v) <- previous-token heads at
S1+1 (their k, read by the induction heads). Corruption by the ABC distribution (three fresh names); mean ablation
over ABC prompts; metric: accuracy (top-1 = IO) and the logit difference IO - S.

Task settings (`conf/task/ioi.yaml`, `task.*`): names (a file), places, objects, templates."""

from __future__ import annotations

import random
from typing import Any, Sequence

from etk.errors import ConfigError
from etk.tasks.base import Desideratum, Group, Pair, Stage, Task
from etk.tasks.ioi.prompts import (
    OBJECTS,
    PLACES,
    ROLES,
    SCALAR_ROLES,
    TEMPLATES,
    IOIPrompt,
    check_template,
    encode_prompt,
    fresh_names,
    generate,
    vocabulary,
    with_names,
)


class IOI(Task):
    name = "ioi"
    description = "indirect object identification: 'When Mary and John went to the store, John gave a drink to' -> ' Mary'"
    roles = ROLES
    scalar_roles = SCALAR_ROLES
    groups = (
        Group("name_mover", "last", "NM", "Name Mover"),
        Group("s_inhibition", "last", "SI", "S-Inhibition"),
        Group("induction", "S2", "IND", "Induction / Duplicate-Token"),
        Group("previous_token", "S1+1", "PREV", "Previous-Token"),
    )
    stages = (
        Stage("name_mover", None),
        Stage("s_inhibition", "q"),
        Stage("induction", "v"),
        Stage("previous_token", "k"),
    )
    knockout_edges = ("last->IO", "last->S2", "last->random", "S2->S1", "S2->S1+1", "S2->random")
    desiderata = (Desideratum("io_name", "IO name"), Desideratum("s_name", "name of S"),
                  Desideratum("s_position", "position of S"))
    schedule = {  # per 1024 heads (scaled to the model): Wang et al.'s circuit is ~3 NM, 4 SI, 4 IND/DT, 2 PREV of 144
        "receivers_top_k": {"name_mover": 20, "s_inhibition": 12, "induction": 12},
        "candidates_top_k": {"name_mover": 40, "s_inhibition": 15, "induction": 15, "previous_token": 8},
    }
    cmap_choice = (("name_mover", "io_name"), ("s_inhibition", "s_position"))
    study_desiderata = ("io_name", "s_name", "s_position")
    title = "IOI study"
    skill = "indirect-object identification"
    vital_phrase = "the circuit's three positions (END, S2, S1+1)"

    def __init__(self, names: str = "names.csv", places: Sequence[str] = PLACES, objects: Sequence[str] = OBJECTS,
                 templates: Sequence[str] = TEMPLATES):
        self.names_file, self.places, self.objects = str(names), tuple(places), tuple(objects)
        self.templates = tuple(check_template(str(t)) for t in templates)
        self._vocab: dict[Any, Any] = {}

    def with_config(self, node) -> "IOI":
        """The task with the settings of `cfg.task` (names, places, objects, templates)."""
        get = (lambda k, d: node.get(k) or d) if hasattr(node, "get") else (lambda k, d: d)
        return IOI(get("names", self.names_file), list(get("places", self.places)), list(get("objects", self.objects)),
                   list(get("templates", self.templates)))

    def vocab(self, tokenizer):
        key = id(tokenizer)
        if key not in self._vocab:
            self._vocab = {key: vocabulary(tokenizer, self.names_file, self.places, self.objects, self.templates)}
        return self._vocab[key]

    def prompts_phrase(self, data_cfg) -> str:
        return "IOI prompts"

    def accuracy_phrase(self, data_cfg) -> str:
        return "IOI accuracy"

    def prompts_description(self, data_cfg) -> str:
        return (f"IOI prompts: {len(self.templates)} templates, ABBA and BABA alternating, single-token names from "
                f"`{self.names_file}`; answer = IO, metric also the logit difference IO - S.")

    def examples(self, data_cfg, tokenizer) -> list[IOIPrompt]:
        return generate(int(data_cfg.n_examples), self.vocab(tokenizer), int(data_cfg.seed))

    def text(self, example: IOIPrompt) -> str:
        return example.render()[0]

    def encode(self, tokenizer, example: IOIPrompt, answer: str | None = None):
        return encode_prompt(tokenizer, example, answer)

    def path_patching_pairs(self, examples: Sequence[IOIPrompt], rng: random.Random) -> list[Pair]:
        """Clean prompt / its ABC version: the same template, place, object and order with three fresh names.
        Target = the clean IO."""
        names = self._names_of(examples)
        out = []
        for ex in examples:
            if ex.answer is None:
                raise ConfigError("clean path-patching prompts need an answer (C repeating the subject)")
            io, s, c = fresh_names(rng, names, {ex.io, ex.s}, 3)
            out.append(Pair(ex, with_names(ex, io, s, c), ex.answer))
        return out

    def ablation_examples(self, cfg, tokenizer) -> list[IOIPrompt]:
        """ABC prompts (three distinct names), seeded by `ablation.seed`: the means of mean ablation."""
        return generate(int(cfg.ablation.n_prompts), self.vocab(tokenizer), 10_000 + int(cfg.ablation.seed), abc=True)

    def desideratum_pairs(self, name: str, bases: Sequence[IOIPrompt], seed: int, legacy: bool = False) -> list[Pair]:
        """`io_name`: a source with other names; target = the source's IO (what the name movers copy).
        `s_name`: the source's subject is the base's IO, at the base's subject position (order kept, a fresh IO);
        target = the base's S — reached if the heads carry the subject's name.
        `s_position`: the other order with two fresh names (the subject at the base IO's position); target = the
        base's S — reached if the heads carry the subject's position."""
        rng = random.Random(seed)
        names = self._names_of(bases)
        out = []
        for b in bases:
            if name == "io_name":
                io, s = fresh_names(rng, names, {b.io, b.s}, 2)
                out.append(Pair(b, with_names(b, io, s), io))
            elif name == "s_name":
                (io,) = fresh_names(rng, names, {b.io, b.s}, 1)
                out.append(Pair(b, with_names(b, io, b.io), b.s))
            elif name == "s_position":
                io, s = fresh_names(rng, names, {b.io, b.s}, 2)
                out.append(Pair(b, with_names(b, io, s, io_first=not b.io_first), b.s))
            else:
                raise ConfigError(f"desideratum {name!r} is not one of the IOI task's: "
                                  f"{', '.join(d.name for d in self.desiderata)} (desideratum=<file> in conf/desideratum)")
        return out

    @staticmethod
    def _names_of(prompts: Sequence[IOIPrompt]) -> list[str]:
        """The names the prompts use, in first-seen order: the pool fresh names are drawn from (single tokens for
        the prompts' tokenizer, and the same however the prompts were made)."""
        return list(dict.fromkeys(n for p in prompts for n in (p.a, p.b, p.c)))

    def check(self, cfg) -> None:
        if not self.templates:
            raise ConfigError("task.templates is empty: give at least one IOI template")


TASK = IOI()

__all__ = ["IOI", "IOIPrompt", "TASK"]
