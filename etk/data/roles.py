"""Named position roles, computed once per example from the tokenization and carried in every batch.

Scalar roles (one index per example): `last`, `query_label`, `prev_query_label` (the queried box's label in the
context), `correct_object`. Vector roles (one index per box): `objects`, `labels`. Undefined roles are -1
(e.g. `prev_query_label` of a prompt whose query label names no box).

Token roles: a partition of every prompt's tokens into named roles (`ROLE_VOCAB`), carried as `token_roles`
[B, T] ids (-1 = padding). The scalar roles take their token; the other boxes' words are `objects[k]` /
`labels[k]` (k = box index; the queried box's are `correct_object` / `prev_query_label`); every other token is
named by the template field it renders (`det`, `relation`, `container`, `segment_text`, `sep`, `end`, `prefix`,
`query_container`, `query_text`), `bos` for special tokens without characters, `other` for anything else.
Methods whose units are (head, position role) — mean ablation, circuit search — read this partition."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from etk.data.boxes import Example, Span
from etk.data.vocab import single_token_id, tokenizer_name
from etk.errors import ConfigError, EtkError

SCALAR_ROLES: tuple[str, ...] = ("last", "query_label", "prev_query_label", "correct_object")
VECTOR_ROLES: tuple[str, ...] = ("objects", "labels")
TEMPLATE_ROLES: tuple[str, ...] = ("bos", "prefix", "det", "relation", "container", "segment_text", "sep", "end",
                                   "query_container", "query_text", "other")
MAX_BOXES = 26
ROLE_VOCAB: tuple[str, ...] = (SCALAR_ROLES + TEMPLATE_ROLES + tuple(f"objects[{k}]" for k in range(MAX_BOXES))
                               + tuple(f"labels[{k}]" for k in range(MAX_BOXES)))
ROLE_ID: dict[str, int] = {r: i for i, r in enumerate(ROLE_VOCAB)}
COLLAPSED_ROLES: tuple[str, ...] = SCALAR_ROLES + VECTOR_ROLES + TEMPLATE_ROLES  # objects[k] -> objects, labels[k] -> labels

# The circuit's groups (SPEC §2) and the position role each acts at: the one map that vital roles, circuit keys,
# path-patching stages, DCM, CMAP and the reports derive from.
GROUP_ROLE: dict[str, str] = {
    "value_fetcher": "last",
    "pos_transmitter": "last",
    "pos_detector": "query_label",
    "struct_reader": "prev_query_label",
}
GROUPS: tuple[str, ...] = tuple(GROUP_ROLE)
SHORT: dict[str, str] = {"value_fetcher": "VF", "pos_transmitter": "PT", "pos_detector": "PD", "struct_reader": "SR"}
VITAL_ROLES: tuple[str, ...] = tuple(dict.fromkeys(GROUP_ROLE.values()))  # last, query_label, prev_query_label
MEMBERS: tuple[str, str] = ("base", "finetuned")  # the two members of a model pair


def key_role(key: str) -> str:
    """The position role a circuit entry acts at: its group's role, or the key itself when it names a role."""
    return GROUP_ROLE.get(key, key)


def groups_at(role: str) -> tuple[str, ...]:
    """The groups acting at a position role (VF and PT share `last`)."""
    return tuple(g for g, r in GROUP_ROLE.items() if r == role)


def collapsed_role(role: str) -> str:
    """A token role with the box index dropped (`objects[3]` -> `objects`): an entry of COLLAPSED_ROLES."""
    return role.split("[")[0]


def check_role(role: str) -> str:
    """`role` if it names a token role, else a ValueError listing the vocabulary's kinds."""
    if role not in ROLE_ID:
        raise ConfigError(f"unknown position role {role!r}; roles are {', '.join(SCALAR_ROLES + TEMPLATE_ROLES)}, "
                         f"objects[k] and labels[k] (k < {MAX_BOXES})")
    return role


class TokenizationError(EtkError, ValueError):
    """A word that must be a single token is not, for this tokenizer."""


@dataclass
class Encoded:
    """One tokenized prompt (unpadded) with its role positions and answer token (-1 if none)."""

    input_ids: list[int]
    roles: dict[str, int | list[int]]
    answer_id: int
    token_roles: list[int] = field(default_factory=list)  # ROLE_ID of every token (the partition)
    index: int = -1  # position in its dataset (set by the dataset), carried by the batch
    weight: float = 1.0  # 0 for a repeat that only fills a distributed process's share of a batch (loss weight)


def _token_at(offsets: list[tuple[int, int]], span: Span, text: str, word: str, tokenizer) -> int:
    for i, (s, e) in enumerate(offsets):
        if e > s and s <= span.start < e:
            if text[s:e].strip() != word:
                raise TokenizationError(
                    f"tokenizer {tokenizer_name(tokenizer)!r} does not keep {word!r} as one token in the prompt "
                    f"(token {i} covers {text[s:e]!r}); choose single-token words for this tokenizer"
                )
            return i
    raise TokenizationError(f"no token covers {word!r} at characters {span.start}-{span.end} of {text!r}")


def encode_example(tokenizer, example: Example, answer: str | None = None) -> Encoded:
    """Tokenize a prompt and locate every role by character offsets (no literal indices).

    `answer` defaults to the example's own answer; pass another word for counterfactual targets."""
    rendered = example.render()
    enc = tokenizer(rendered.text, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    text = rendered.text
    ctx = example.context
    objs = [_token_at(offsets, sp, text, w, tokenizer) for sp, w in zip(rendered.objects, ctx.objects)]
    labs = [_token_at(offsets, sp, text, w, tokenizer) for sp, w in zip(rendered.labels, ctx.labels)]
    ql = _token_at(offsets, rendered.query_label, text, example.query_label, tokenizer)
    q = example.query
    roles: dict[str, int | list[int]] = {
        "last": len(ids) - 1,
        "query_label": ql,
        "prev_query_label": labs[q] if q is not None else -1,
        "correct_object": objs[q] if q is not None else -1,
        "objects": objs,
        "labels": labs,
    }
    if q is not None and ids[roles["prev_query_label"]] != ids[ql]:
        raise TokenizationError(f"query label token differs from its context occurrence in {text!r}")
    token_roles = _token_roles(rendered, offsets, roles, q)
    word = answer if answer is not None else example.answer
    answer_id = -1
    if word is not None:
        tid = single_token_id(tokenizer, word)
        if tid is None:
            raise TokenizationError(f"tokenizer {tokenizer_name(tokenizer)!r} splits the answer {word!r} into several tokens")
        answer_id = tid
    return Encoded(ids, roles, answer_id, token_roles)


def _token_roles(rendered, offsets: list[tuple[int, int]], roles: dict, q: int | None) -> list[int]:
    """The role id of every token: its first non-space character's template piece, then the word roles."""
    text = rendered.text
    out = []
    for s, e in offsets:
        c = next((i for i in range(s, e) if not text[i].isspace()), s if e > s else None)
        name = "bos" if c is None else next((r for a, b, r in rendered.pieces if a <= c < b), "other")
        out.append(ROLE_ID.get(name, ROLE_ID["other"]))
    for k, (o, lab) in enumerate(zip(roles["objects"], roles["labels"])):
        out[o], out[lab] = ROLE_ID[f"objects[{k}]"], ROLE_ID[f"labels[{k}]"]
    for name in ("correct_object", "prev_query_label", "query_label", "last"):
        if roles[name] >= 0:
            out[roles[name]] = ROLE_ID[name]
    return out


@dataclass
class PromptBatch:
    """A padded batch of prompts. Role tensors hold absolute indices into the padded sequence."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor  # [B, T] long, 0 at the first real token (valid under left padding)
    roles: dict[str, torch.Tensor] = field(default_factory=dict)  # scalar [B], vector [B, n_boxes]
    answer: torch.Tensor | None = None  # [B] long, -1 where undefined
    token_roles: torch.Tensor | None = None  # [B, T] long ROLE_ID of every token, -1 at padding
    index: torch.Tensor | None = None  # [B] long dataset index of each prompt (-1 unknown)
    weight: torch.Tensor | None = None  # [B] float loss weight: 1, or 0 for a row repeated to fill a process's share

    def repeat(self, k: int) -> "PromptBatch":
        """The batch stacked k times along the batch axis (row i*B + b = prompt b), e.g. for k configurations."""
        rep = lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))  # noqa: E731
        return PromptBatch(rep(self.input_ids), rep(self.attention_mask), rep(self.position_ids),
                           {n: rep(v) for n, v in self.roles.items()}, rep(self.answer), rep(self.token_roles),
                           rep(self.index), rep(self.weight))

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
    for name in SCALAR_ROLES:
        r = torch.tensor([it.roles[name] for it in items], dtype=torch.long)
        roles[name] = torch.where(r >= 0, r + shift, r)
    for name in VECTOR_ROLES:  # [B, max boxes]; prompts with fewer boxes are padded with -1
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
    return PromptBatch(ids, mask, position_ids, roles, answer, troles, index, weight)


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
