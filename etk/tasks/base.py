"""What a task is: the one definition every method reads (prompts, roles, counterfactuals, circuit groups, the
path-patching stage graph, knockout edges, report words). A task is a folder `etk/tasks/<name>/` whose module
defines a `Task` subclass and registers one instance in `etk.tasks` (one line); methods get it with
`etk.tasks.task_of(cfg)` and never import a task's module.

    task = task_of(cfg)
    examples = task.examples(cfg.data, tokenizer)            # the evaluation prompts
    pairs = task.path_patching_pairs(examples, rng)           # clean / corrupt, target = the clean answer
    enc = task.encode(tokenizer, pairs[0].base, answer=...)   # ids, roles, token-role partition, answer id
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from etk.data.roles import Encoded
from etk.errors import ConfigError


@dataclass(frozen=True)
class Group:
    """A circuit group: heads acting at one position role."""

    name: str  # config key (`value_fetcher`, `name_mover`)
    role: str  # the position role its heads act at (a scalar role of the task's prompts)
    short: str  # the report's abbreviation (`VF`, `NM`)
    title: str  # the report's words ("Value Fetcher heads")


@dataclass(frozen=True)
class Stage:
    """One stage of path patching: the group whose heads are scored as senders at the group's role; their effect is
    measured directly on the logits (`receiver_site` None) or through the previous stage's top heads' input at the
    same position (`q`, `k` or `v`: per KV group under GQA). `corrupt_role` is the sender's position in the corrupt
    prompt: None = its clean role; `<vector role>[source_box]` = that entity of the corrupt prompt drawn per pair."""

    group: str
    receiver_site: str | None
    corrupt_role: str | None = None


@dataclass(frozen=True)
class Pair:
    """A base prompt, a source prompt, and the target word expected when the source's information is patched in.
    `source_box`: an entity index of the source drawn per pair (entity tracking's Structure-Reader stage)."""

    base: Any
    source: Any
    target: str
    source_box: int = -1


@dataclass(frozen=True)
class Desideratum:
    """A counterfactual question about a group's heads: what the target is when they carry the source's value."""

    name: str  # config name (`desideratum=<file>` sets `desideratum.name`)
    short: str  # the report's words ("object value", "name of S")


class Task:
    """The interface every task implements. Class attributes describe the task; methods build its data."""

    name: str = ""
    description: str = ""
    roles: tuple[str, ...] = ()  # every token role its prompts use (registered in etk.data.roles' namespace)
    scalar_roles: tuple[str, ...] = ()  # roles with one position per prompt (`last` among them)
    groups: tuple[Group, ...] = ()  # the circuit's groups, in the circuit's order
    stages: tuple[Stage, ...] = ()  # path patching's stage graph, in order (the first: direct effect)
    knockout_edges: tuple[str, ...] = ()  # default `query_role->key_role` edges of `method=knockout`
    desiderata: tuple[Desideratum, ...] = ()
    # path patching's sizes for a 1024-head model (scaled to the model): receivers passed on, candidates kept
    schedule: dict[str, dict[str, int]] = {"receivers_top_k": {}, "candidates_top_k": {}}
    pruning_order_: tuple[str, ...] = ()  # minimality's group order (default: the groups reversed)
    cmap_choice: tuple[tuple[str, str], ...] = ()  # (group, desideratum config file) whose DCM heads CMAP patches
    study_desiderata: tuple[str, ...] = ()  # desideratum config files the study's DCM step trains
    study_ap_desiderata: tuple[str, ...] = ()  # those whose DCM heads the study activation-patches (default: all)
    hypotheses_desiderata: tuple[str, ...] = ()  # those whose DCM heads `positional_hypotheses` scores (none: skip)
    hypotheses: tuple[str, ...] = ()  # positional hypotheses `hypothesis_targets` names (none: the method refuses)
    # the report's words
    title: str = ""  # "Entity-tracking study"
    skill: str = ""  # "tracking": "Fine-tuning does not change <skill> significantly"
    vital_phrase: str = ""  # "the paper's three positions (last, query label, the queried box's label)"

    def with_config(self, node) -> "Task":
        """The task with the settings of the run's `task` config node (a task without settings: itself)."""
        return self

    # -- derived views: one definition each ------------------------------------------------------------------------
    @property
    def group_role(self) -> dict[str, str]:
        return {g.name: g.role for g in self.groups}

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    @property
    def short(self) -> dict[str, str]:
        return {g.name: g.short for g in self.groups}

    @property
    def vital_roles(self) -> tuple[str, ...]:
        """The positions the groups act at, `last` first: the paper's three for entity tracking."""
        return tuple(dict.fromkeys(["last", *self.group_role.values()]))

    @property
    def pruning_order(self) -> tuple[str, ...]:
        """The order minimality prunes the groups in."""
        return self.pruning_order_ or tuple(reversed(self.group_names))

    def groups_at(self, role: str) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups if g.role == role)

    def shared_role_note(self) -> str:
        """How the candidate sets treat groups sharing a role ("PT candidates removed from VF"), or ""."""
        names = self.group_names
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if self.group_role[a] == self.group_role[b]]
        return "; ".join(f"{self.short[b]} candidates removed from {self.short[a]}" for a, b in pairs)

    def desideratum_short(self, name: str) -> str:
        return next((d.short for d in self.desiderata if d.name == name), name)

    @property
    def collapsed_roles(self) -> tuple[str, ...]:
        """The token roles with entity indices dropped (`objects[3]` -> `objects`): model diffing's rows."""
        return tuple(dict.fromkeys(r.split("[")[0] for r in self.roles))

    def role_summary(self) -> list[str]:
        """The role names for messages (indexed entity roles collapsed to `name[k]`)."""
        return list(dict.fromkeys(r.split("[")[0] + ("[k]" if "[" in r else "") for r in self.roles))

    def prompt_meta(self, data_cfg) -> dict[str, Any]:
        """What a circuit file records about the prompts it was found on."""
        return {"task": self.name}

    def prompts_phrase(self, data_cfg) -> str:
        """How the report names the prompts ("7-box prompts")."""
        return f"{self.name} prompts"

    def accuracy_phrase(self, data_cfg) -> str:
        """How the report names the accuracy ("7-box accuracy")."""
        return f"{self.name} accuracy"

    def prompts_description(self, data_cfg) -> str:
        """The report's sentence about the prompts ("7-box prompts, paper template, objects from `objects.csv`.")."""
        return f"{self.prompts_phrase(data_cfg)}."

    # -- data: each task implements these --------------------------------------------------------------------------
    def examples(self, data_cfg, tokenizer) -> list:
        """The evaluation prompts `data_cfg` describes (`n_examples`, `seed`, ...), in a fixed order."""
        raise NotImplementedError

    def text(self, example) -> str:
        """The prompt's text."""
        raise NotImplementedError

    def encode(self, tokenizer, example, answer: str | None = None) -> Encoded:
        """Token ids, role positions, the token-role partition and the answer id (`answer` overrides the example's)."""
        raise NotImplementedError

    def path_patching_pairs(self, examples: Sequence, rng: random.Random) -> list[Pair]:
        """Clean / corrupt pairs; target = the clean answer."""
        raise NotImplementedError

    def ablation_examples(self, cfg, tokenizer) -> list:
        """The prompts whose per-position mean activations mean ablation uses (`cfg.ablation`, `cfg.data`); one shape."""
        raise NotImplementedError

    def hypothesis_targets(self, pair: Pair, base, source) -> dict[str, str | None]:
        """Each of `hypotheses`' target word for a pair (None where it names none), from the two prompts' encodings."""
        raise ConfigError(f"task {self.name!r} has no positional hypotheses")

    def cross_length_pairs(self, bases: Sequence, pool: Sequence, rng: random.Random) -> list[Pair]:
        """Pairs whose sources (from `pool`) have another size than their bases."""
        raise ConfigError(f"task {self.name!r} has no cross-length pairs")

    def desideratum_pairs(self, name: str, bases: Sequence, seed: int, legacy: bool = False) -> list[Pair]:
        """DCM / activation-patching pairs of one split; sources from the same split."""
        raise NotImplementedError

    def unit(self, data_cfg) -> int:
        """Prompts that share a context in `examples` order (splits at multiples of it share none)."""
        return 1

    def split(self, examples: Sequence, sizes: Sequence[int]) -> list[list]:
        """Consecutive splits of `sizes` prompts each (a task whose prompts share contexts splits at whole contexts)."""
        out, i = [], 0
        for n in sizes:
            if i + n > len(examples):
                raise ConfigError(f"not enough prompts for splits {list(sizes)}: generate at least {sum(sizes)} examples")
            out.append(list(examples[i:i + n]))
            i += n
        return out

    def eval_sets(self, data_cfg, method_cfg) -> list[tuple[dict[str, Any], Any]]:
        """(row labels, data config) of each evaluation set of `method=eval` (entity tracking: one per box count)."""
        return [({}, data_cfg)]

    def check(self, cfg) -> None:
        """Task-specific config checks, before any model loads (ConfigError)."""
