"""The four stages of circuit discovery, their positions and receivers, and the batch they run on."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from etk.data.boxes import Example
from etk.data.datasets import EncodedDataset, pad_id
from etk.data.pairs import Pair, path_patching_pairs
from etk.data.roles import GROUP_ROLE, PairBatch, PromptBatch, collate_pairs, encode_example
from etk.errors import ConfigError
from etk.interventions.components import HeadId
from etk.interventions.heads import HeadSet
from etk.models.arch import Dims


@dataclass(frozen=True)
class Stage:
    group: str
    corrupt_role: str  # role in the corrupt prompt ("label_of_source_box": the pair's random box label)
    receiver_site: str | None  # None = direct effect on the logits; "q" or "v"

    @property
    def sender_role(self) -> str:
        """The sender's role in the clean prompt: its group's role."""
        return GROUP_ROLE[self.group]


STAGES: dict[str, Stage] = {
    "value_fetcher": Stage("value_fetcher", "last", None),
    "pos_transmitter": Stage("pos_transmitter", "last", "q"),
    "pos_detector": Stage("pos_detector", "query_label", "v"),
    "struct_reader": Stage("struct_reader", "label_of_source_box", "v"),
}
ORDER = tuple(STAGES)


class PPBatch(PairBatch):
    """Path-patching pairs: `clean` is the base prompt (its answer is the target), `corrupt` the source."""

    @property
    def clean(self) -> PromptBatch:
        return self.base

    @property
    def corrupt(self) -> PromptBatch:
        return self.source

    def positions(self, stage: Stage) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_s in the clean prompt [B], p'_s in the corrupt prompt [B])."""
        p = self.clean.roles[stage.sender_role]
        if stage.corrupt_role == "label_of_source_box":
            labels = self.corrupt.roles["labels"]  # [B, n_boxes]
            pc = labels[torch.arange(len(self)), self.source_box]
        else:
            pc = self.corrupt.roles[stage.corrupt_role]
        return p, pc


def pp_loader(tokenizer, examples: Sequence[Example], seed: int, batch_size: int, padding_side: str = "right") -> DataLoader:
    """Clean/corrupt pairs (SPEC §2.1), encoded once; target = the clean answer."""
    pairs: list[Pair] = path_patching_pairs(examples, random.Random(seed))
    items = [(encode_example(tokenizer, p.base), encode_example(tokenizer, p.source, answer=p.target), p.source_box)
             for p in pairs]
    return DataLoader(EncodedDataset(items), batch_size=batch_size, shuffle=False,
                      collate_fn=partial(collate_pairs, pad_id=pad_id(tokenizer), padding_side=padding_side, cls=PPBatch))


@dataclass(frozen=True)
class Receivers:
    """Receiver units of a stage: per layer, the query heads (q) or KV groups (v) whose input is patched."""

    site: str
    units: dict[int, list[int]]  # layer -> unit indices (sorted)

    @property
    def layers(self) -> list[int]:
        return sorted(self.units)

    @property
    def max_layer(self) -> int:
        return max(self.units)


def receivers_from(heads: Sequence[HeadId], site: str, dims: Dims) -> Receivers:
    """q receivers are the heads themselves; v receivers are their KV groups (under GQA a group serves several
    query heads, so patching its v affects all of them): the head set's KV-group view."""
    hs = HeadSet.at("last", heads)  # the role is immaterial here: receivers are read at the stage's sender position
    units = ({layer: sorted(h for _, h in items) for layer, items in hs.by_layer("last").items()} if site == "q"
             else hs.kv_groups("last", dims))
    return Receivers(site, units)


def minimum_blocks(batch: "PPBatch", stage: Stage, receivers: Receivers | None, senders: Sequence[HeadId],
                   n_layers: int) -> int:
    """The fewest (token, layer) blocks the definition needs for this batch: the clean and the corrupt forward, and
    per (prompt, sender): its position-local chain from the sender's layer to the deepest receiver at p_s (to the
    top for the direct-effect stage), then, from the shallowest receiver above the sender, every layer at every
    suffix token p_s..last (the receivers' patch reaches all of them). What a speed-of-light line compares with."""
    L = n_layers
    base = 2 * int(batch.clean.attention_mask.sum()) * L
    if not senders:
        return base
    p_s, _ = batch.positions(stage)
    suffix = int((batch.clean.roles["last"] - p_s + 1).sum())  # summed over prompts
    B = len(batch)
    layers = torch.tensor([s.layer for s in senders])
    if receivers is None:
        return base + B * int((L - layers).sum())
    rl = torch.tensor(receivers.layers)
    shallowest = torch.tensor([int(rl[rl > layer].min()) if (rl > layer).any() else L for layer in layers.tolist()])
    local = B * int((receivers.max_layer - layers).clamp_min(0).sum())
    return base + local + suffix * int((L - shallowest).sum())


def reachable_layers(stage: Stage, receivers: Receivers | None, n_layers: int) -> list[int]:
    """Sender layers that can matter: all for the direct-effect stage, else layers below the deepest receiver."""
    if stage.receiver_site is None or receivers is None:
        return list(range(n_layers))
    return list(range(min(receivers.max_layer, n_layers)))


LLAMA_SCHEDULE: dict[str, dict[str, int]] = {  # the paper's Llama-7B schedule (1024 heads), SPEC §2.4-2.5
    "receivers_top_k": {"value_fetcher": 20, "pos_transmitter": 5, "pos_detector": 10},
    "candidates_top_k": {"value_fetcher": 58, "pos_transmitter": 10, "pos_detector": 25, "struct_reader": 5},
}


def discovery_schedule(method_cfg, model_cfg, dims: Dims) -> dict[str, dict[str, int]]:
    """`receivers_top_k` and `candidates_top_k` per group: the method config's value where set, else the model
    config's `discovery` block (the paper's per-model schedules), else the Llama schedule scaled to the model's
    head count (at least 1 head per group). Sizes above the number of scored heads take them all."""
    n = dims.n_layers * dims.n_heads
    out = {}
    for key, llama in LLAMA_SCHEDULE.items():
        given = method_cfg.get(key) or (model_cfg.get("discovery") or {}).get(key)
        out[key] = ({g: int(v) for g, v in given.items()} if given
                    else {g: max(1, round(v * n / 1024)) for g, v in llama.items()})
        for g, v in out[key].items():
            if v < 1:
                raise ConfigError(f"{key}.{g} = {v}: must be at least 1")
    return out
