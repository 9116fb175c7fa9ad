"""Token roles: one namespace of role names shared by every task, and the batches that carry them.

A task (`etk/tasks/<name>/`) names the roles of its prompts: scalar roles (one position per prompt, e.g. `last`,
the position the answer is read at, which every task has), vector roles (one position per entity, e.g. the boxes'
`objects`), and the token roles that partition every prompt's tokens (`objects[3]`, `det`, `S2`, ...). The
partition is carried as `token_roles` [B, T] ids into `ROLE_VOCAB` (-1 = padding); methods whose units are (head,
position role) — mean ablation, circuit search — index tables by these ids. The namespace is the union of the
registered tasks' roles, in registration order (entity tracking first, so its ids never move); a name means the
same thing in every task that uses it. It fills itself from `etk.tasks` on first use."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterable, Iterator

import torch

from etk.errors import ConfigError, EtkError

MEMBERS: tuple[str, str] = ("base", "finetuned")  # the two members of a model pair


class _Namespace:
    """The role names of every registered task, with stable ids (read like a tuple / a dict)."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._ids: dict[str, int] = {}
        self._loading = False

    def register(self, names: Iterable[str]) -> None:
        """Add role names (a name already present keeps its id)."""
        for n in names:
            if n not in self._ids:
                self._ids[n] = len(self._names)
                self._names.append(n)

    def _ready(self) -> None:
        if not self._loading and "last" not in self._ids:
            self._loading = True
            import etk.tasks  # noqa: F401  (registers every task's roles)
            self._loading = False


_NAMESPACE = _Namespace()


class RoleVocab:
    """`ROLE_VOCAB`: id -> name (a sequence)."""

    def __len__(self) -> int:
        _NAMESPACE._ready()
        return len(_NAMESPACE._names)

    def __getitem__(self, i):
        _NAMESPACE._ready()
        return _NAMESPACE._names[i]

    def __iter__(self) -> Iterator[str]:
        _NAMESPACE._ready()
        return iter(list(_NAMESPACE._names))

    def __contains__(self, name: object) -> bool:
        _NAMESPACE._ready()
        return name in _NAMESPACE._ids

    def index(self, name: str) -> int:
        _NAMESPACE._ready()
        return _NAMESPACE._ids[name]


class RoleIds:
    """`ROLE_ID`: name -> id (a mapping)."""

    def __getitem__(self, name: str) -> int:
        _NAMESPACE._ready()
        return _NAMESPACE._ids[name]

    def __contains__(self, name: object) -> bool:
        _NAMESPACE._ready()
        return name in _NAMESPACE._ids

    def __len__(self) -> int:
        _NAMESPACE._ready()
        return len(_NAMESPACE._ids)

    def get(self, name: str, default=None):
        _NAMESPACE._ready()
        return _NAMESPACE._ids.get(name, default)

    def items(self):
        _NAMESPACE._ready()
        return list(_NAMESPACE._ids.items())


ROLE_VOCAB = RoleVocab()
ROLE_ID = RoleIds()


def register_roles(names: Iterable[str]) -> None:
    """Add a task's role names to the namespace (called by `etk.tasks.register`)."""
    _NAMESPACE.register(names)


def check_role(role: str) -> str:
    """`role` if it names a token role of a registered task, else a ConfigError."""
    if role not in ROLE_ID:
        from etk.tasks import TASKS

        raise ConfigError(f"unknown position role {role!r}; the tasks' roles are: "
                          + "; ".join(f"{t.name}: {', '.join(t.role_summary())}" for t in TASKS.values()))
    return role


def collapsed_role(role: str) -> str:
    """A token role with its entity index dropped (`objects[3]` -> `objects`)."""
    return role.split("[")[0]


class TokenizationError(EtkError, ValueError):
    """A word that must be a single token is not, for this tokenizer."""


@dataclass
class Encoded:
    """One tokenized prompt (unpadded) with its role positions and answer token (-1 if none)."""

    input_ids: list[int]
    roles: dict[str, int | list[int]]
    answer_id: int
    token_roles: list[int] = field(default_factory=list)  # ROLE_ID of every token (the partition)
    distractor_id: int = -1  # a wrong answer whose logit the task's metric subtracts (IOI: the subject), -1 if none
    index: int = -1  # position in its dataset (set by the dataset), carried by the batch
    weight: float = 1.0  # 0 for a repeat that only fills a distributed process's share of a batch (loss weight)


@dataclass
class PromptBatch:
    """A padded batch of prompts. Role tensors hold absolute indices into the padded sequence."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor  # [B, T] long, 0 at the first real token (valid under left padding)
    roles: dict[str, torch.Tensor] = field(default_factory=dict)  # scalar [B], vector [B, max entities]
    answer: torch.Tensor | None = None  # [B] long, -1 where undefined
    token_roles: torch.Tensor | None = None  # [B, T] long ROLE_ID of every token, -1 at padding
    index: torch.Tensor | None = None  # [B] long dataset index of each prompt (-1 unknown)
    weight: torch.Tensor | None = None  # [B] float loss weight: 1, or 0 for a row repeated to fill a process's share
    distractor: torch.Tensor | None = None  # [B] long: the task's wrong answer for a logit difference, -1 where none

    def repeat(self, k: int) -> "PromptBatch":
        """The batch stacked k times along the batch axis (row i*B + b = prompt b), e.g. for k configurations."""
        rep = lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))  # noqa: E731
        return PromptBatch(rep(self.input_ids), rep(self.attention_mask), rep(self.position_ids),
                           {n: rep(v) for n, v in self.roles.items()}, rep(self.answer), rep(self.token_roles),
                           rep(self.index), rep(self.weight), rep(self.distractor))

    def rows(self, idx: torch.Tensor) -> "PromptBatch":
        """The prompts `idx` [k] of the batch (every per-row field indexed)."""
        take = lambda t: None if t is None else t[idx]  # noqa: E731
        return PromptBatch(take(self.input_ids), take(self.attention_mask), take(self.position_ids),
                           {n: take(v) for n, v in self.roles.items()}, take(self.answer), take(self.token_roles),
                           take(self.index), take(self.weight), take(self.distractor))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "PromptBatch":
        return PromptBatch(
            **{f.name: _to(getattr(self, f.name), device) for f in fields(self)}  # type: ignore[arg-type]
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def collate(items: list[Encoded], pad_id: int, padding_side: str = "right") -> PromptBatch:
    """Pad a list of encoded prompts and shift their roles accordingly."""
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    T = max(len(it.input_ids) for it in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    troles = torch.full((B, T), -1, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    shift = torch.zeros(B, dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it.input_ids)
        off = T - n if padding_side == "left" else 0
        ids[b, off : off + n] = torch.tensor(it.input_ids)
        if it.token_roles:
            troles[b, off : off + n] = torch.tensor(it.token_roles)
        mask[b, off : off + n] = 1
        shift[b] = off
    roles: dict[str, torch.Tensor] = {}
    names = list(items[0].roles)
    for name in (n for n in names if not isinstance(items[0].roles[n], list)):  # scalar roles: [B]
        r = torch.tensor([it.roles[name] for it in items], dtype=torch.long)
        roles[name] = torch.where(r >= 0, r + shift, r)
    for name in (n for n in names if isinstance(items[0].roles[n], list)):  # vector roles: [B, max entities], -1 pad
        width = max(len(it.roles[name]) for it in items)  # type: ignore[arg-type]
        r = torch.full((B, width), -1, dtype=torch.long)
        for b, it in enumerate(items):
            v = torch.tensor(it.roles[name], dtype=torch.long)
            r[b, : len(v)] = v + shift[b]
        roles[name] = r
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    answer = torch.tensor([it.answer_id for it in items], dtype=torch.long)
    index = torch.tensor([it.index for it in items], dtype=torch.long)
    weight = torch.tensor([it.weight for it in items], dtype=torch.float32)
    distractor = torch.tensor([it.distractor_id for it in items], dtype=torch.long)
    return PromptBatch(ids, mask, position_ids, roles, answer, troles, index, weight, distractor)


@dataclass
class PairBatch:
    """Base and source prompts of a batch of counterfactual pairs. `base.answer` holds the pair's target (the
    desideratum's expected token, or the clean answer in path patching); each side carries its own roles."""

    base: PromptBatch
    source: PromptBatch
    source_box: torch.Tensor | None = None  # [B] long: a box index of the source (path patching's SR stage)

    def to(self, device) -> "PairBatch":
        box = None if self.source_box is None else self.source_box.to(device)
        return type(self)(self.base.to(device), self.source.to(device), box)

    def __len__(self) -> int:
        return len(self.base)


def collate_pairs(items: list[tuple[Encoded, Encoded, int]], pad_id: int, padding_side: str = "right", cls=PairBatch):
    """Pad (base, source, source_box) triples into a PairBatch (or a subclass)."""
    base = collate([b for b, _, _ in items], pad_id, padding_side)
    source = collate([s for _, s, _ in items], pad_id, padding_side)
    return cls(base, source, torch.tensor([k for _, _, k in items], dtype=torch.long))
