"""The stages of circuit discovery (the task's stage graph: `Task.stages`), their positions and receivers, and the
batch they run on."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from etk.data.datasets import EncodedDataset, pad_id
from etk.data.roles import PairBatch, PromptBatch, collate_pairs
from etk.errors import ConfigError
from etk.interventions.components import HeadId, site_spec
from etk.interventions.heads import HeadSet
from etk.models.arch import Dims
from etk.tasks import Task


@dataclass(frozen=True)
class Stage:
    """A task's stage (`etk.tasks.Stage`) with its positions resolved: the sender's role in the clean prompt (its
    group's role) and in the corrupt prompt."""

    group: str
    sender_role: str  # the sender's position role in the clean prompt
    corrupt_role: str  # its position in the corrupt prompt; `<vector role>[source_box]`: the pair's drawn entity
    receiver_site: str | None  # None = direct effect on the logits; "q", "k" or "v"


def task_stages(task: Task) -> dict[str, Stage]:
    """The task's stage graph, in order: group -> Stage."""
    out = {}
    for s in task.stages:
        role = task.group_role[s.group]
        out[s.group] = Stage(s.group, role, s.corrupt_role or role, s.receiver_site)
    return out


class PPBatch(PairBatch):
    """Path-patching pairs: `clean` is the base prompt (its answer is the target), `corrupt` the source."""

    @property
    def clean(self) -> PromptBatch:
        return self.base

    @property
    def corrupt(self) -> PromptBatch:
        return self.source

    def entities(self, stage: Stage) -> torch.Tensor:
        """[B, E] the corrupt prompt's positions of the stage's drawn entity role (`<role>[source_box]`)."""
        return self.corrupt.roles[stage.corrupt_role[: -len("[source_box]")]]

    def positions(self, stage: Stage) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_s in the clean prompt [B], p'_s in the corrupt prompt [B])."""
        p = self.clean.roles[stage.sender_role]
        if stage.corrupt_role.endswith("[source_box]"):
            entities = self.corrupt.roles[stage.corrupt_role[: -len("[source_box]")]]  # [B, n entities]
            pc = entities[torch.arange(len(self)), self.source_box]
        else:
            pc = self.corrupt.roles[stage.corrupt_role]
        return p, pc


def sender_draws(batch: "PPBatch", stage: Stage, n_layers: int, n_heads: int, seed: int) -> torch.Tensor | None:
    """The paper's draw ([BUG-SRpos] kept, D1): for a stage whose corrupt position is an entity drawn per pair
    (`<role>[source_box]`), an entity of the corrupt prompt drawn anew per (prompt, sender): [B, L, H] indices, keyed
    by each prompt's dataset index (the same for a prompt in any batch, on any process). None for other stages."""
    if not stage.corrupt_role.endswith("[source_box]"):
        return None
    entities = batch.corrupt.roles[stage.corrupt_role[: -len("[source_box]")]]  # [B, E], -1 padded
    n = (entities >= 0).sum(1)  # [B]
    index = batch.clean.index
    idx = index.cpu() if index is not None and bool((index >= 0).all()) else torch.arange(len(batch))
    table = torch.rand(int(idx.max()) + 1, n_layers, n_heads, generator=torch.Generator().manual_seed(seed))
    u = table[idx].to(entities.device)  # [B, L, H]: a longer table keeps its prefix
    return torch.minimum((u * n[:, None, None]).long(), (n - 1)[:, None, None])


def corrupt_z_per_sender(z_at_entities: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """z of each head at its own drawn entity: z_at_entities [B, E, H, D], draws [B, H] -> [B, H, D]."""
    B, E, H, D = z_at_entities.shape
    return z_at_entities.permute(0, 2, 1, 3).gather(2, draws[:, :, None, None].expand(B, H, 1, D))[:, :, 0]


def pp_loader(task: Task, tokenizer, examples: Sequence, seed: int, batch_size: int,
              padding_side: str = "right") -> DataLoader:
    """The task's clean/corrupt pairs (entity tracking: SPEC §2.1), encoded once; target = the clean answer."""
    pairs = task.path_patching_pairs(examples, random.Random(seed))
    items = [(task.encode(tokenizer, p.base), task.encode(tokenizer, p.source, answer=p.target), p.source_box)
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
    """q receivers are the heads themselves; k and v receivers are their KV groups (under GQA a group serves several
    query heads, so patching its k or v affects all of them): the head set's KV-group view."""
    hs = HeadSet.at("last", heads)  # the role is immaterial here: receivers are read at the stage's sender position
    units = (hs.kv_groups("last", dims) if site_spec(site).per_group
             else {layer: sorted(h for _, h in items) for layer, items in hs.by_layer("last").items()})
    return Receivers(site, units)


def minimum_blocks(batch: "PPBatch", stage: Stage, receivers: Receivers | None, senders: Sequence[HeadId],
                   n_layers: int, cache_forwards: int = 2) -> int:
    """The fewest (token, layer) blocks the definition needs for this batch: the clean and the corrupt forward
    (`cache_forwards`: 2, or 0 for a stage that reads a discovery's shared ones), and per (prompt, sender): its
    position-local chain from the sender's layer to the deepest receiver at p_s (to the top for the direct-effect
    stage), then, from the shallowest receiver above the sender, every layer at every suffix token p_s..last (the
    receivers' patch reaches all of them) but the top one, where only `last` is read (the others run attention only,
    for its K/V). What a speed-of-light line compares with."""
    L = n_layers
    base = cache_forwards * int(batch.clean.attention_mask.sum()) * L
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
    top_others = (suffix - B) * int((shallowest < L).sum())  # suffix tokens before `last` at the top layer
    return base + local + suffix * int((L - shallowest).sum()) - top_others


def reachable_layers(stage: Stage, receivers: Receivers | None, n_layers: int) -> list[int]:
    """Sender layers that can matter: all for the direct-effect stage, else layers below the deepest receiver."""
    if stage.receiver_site is None or receivers is None:
        return list(range(n_layers))
    return list(range(min(receivers.max_layer, n_layers)))


def discovery_schedule(method_cfg, model_cfg, dims: Dims, task: Task) -> dict[str, dict[str, int]]:
    """`receivers_top_k` and `candidates_top_k` per group: the method config's value where set, else the model
    config's `discovery` block when it names the task's groups (the paper's per-model schedules), else the task's
    schedule for 1024 heads (entity tracking: the paper's Llama-7B one) scaled to the model's head count (at least
    1 head per group). Sizes above the number of scored heads take them all."""
    n = dims.n_layers * dims.n_heads
    out = {}
    for key, llama in task.schedule.items():
        from_model = (model_cfg.get("discovery") or {}).get(key)
        if from_model and not set(from_model) <= set(task.group_names):
            from_model = None  # the model's schedule is for another task's groups
        given = method_cfg.get(key) or from_model
        out[key] = ({g: int(v) for g, v in given.items()} if given
                    else {g: max(1, round(v * n / 1024)) for g, v in llama.items()})
        for g, v in out[key].items():
            if v < 1:
                raise ConfigError(f"{key}.{g} = {v}: must be at least 1")
    return out
