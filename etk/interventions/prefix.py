"""Reuse of a frozen model's work on a fixed dataset: a bounded per-row cache, and the base prompts' unpatched
prefix.

A patch at positions >= s leaves every position < s of the prompt as in the unpatched run (causality), so a
patched forward is split in two: the prefix (positions < s, no intervention: computed once per prompt and
cached) and the suffix s..last, run on the prefix's K/V with the patches shifted to suffix positions. DCM
(training, validation, test), activation patching and CMAP run this split forward whenever the prefix is at hand
(activation patching and CMAP take it from the unpatched run they need anyway) or holds at least a quarter of the
batch's positions (`split_position`; else one plain patched forward), cached or not, so a cached run is
bit-identical to one that recomputes every prefix."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from etk.data.roles import PromptBatch
from etk.interventions.hooks import Patch, hooked
from etk.models.arch import LlamaFamily
from etk.models.forward import cache_kwargs, last_logits, output_cache

Row = dict[Any, torch.Tensor]  # one dataset row's tensors


def cache_budget(setting) -> float | str:
    """A `cache_mb` setting: MB (0 = off) or `auto` (sized from free memory, `RowCache`)."""
    if str(setting) == "auto":
        return "auto"
    try:
        return float(setting)
    except (TypeError, ValueError):
        from etk.errors import ConfigError

        raise ConfigError(f"cache_mb={setting!r} is neither a number of MB (0 = off) nor auto") from None


def memory_budget(max_mb: float | str, device: torch.device) -> float:
    """Bytes a cache may hold: `max_mb` MB, or for `auto` half the CUDA device's free memory (a quarter of the
    host's available RAM) at the time of asking."""
    if str(max_mb) != "auto":
        return float(max_mb) * 2 ** 20
    from etk.models.loading import free_memory_bytes

    return float(free_memory_bytes(device)) * (0.5 if torch.device(device).type == "cuda" else 0.25)


class RowCache:
    """Per-row results of a frozen model on a fixed dataset, kept per split and dataset index, so that later epochs,
    validation checks, head sets and repeats read them instead of recomputing: the same tensors, so the numbers are
    unchanged. Bounded by `max_mb` (rows beyond it are recomputed each time); `max_mb=0` turns it off."""

    def __init__(self, max_mb: float | str = "auto"):
        """`max_mb`: the budget in MB; `auto` sizes it at the first store from the free memory of the rows' device
        (half the CUDA device's free memory, a quarter of the host's available RAM): on a GPU a 7B model's prefix
        rows (~57 MB each) then fit, where a fixed 512 MB held ~9 of them."""
        self.max_bytes: float | None = None if str(max_mb) == "auto" else float(max_mb) * 2 ** 20
        self.used = 0
        self.rows: dict[str, dict[int, Row]] = {}
        self.hits = self.misses = 0

    def budget(self, device: torch.device) -> float:
        if self.max_bytes is None:
            self.max_bytes = memory_budget("auto", device)
        return self.max_bytes

    def get(self, split: str | None, index: torch.Tensor | None, compute: Callable[[], list[Row]],
            valid: Callable[[int, Row], bool] | None = None) -> list[Row]:
        """The rows `index` [B] of `split`, from the cache when all of them are there (and `valid(b, row)` holds for
        each), else from `compute()` (a list of B rows, then stored while the budget lasts)."""
        if self.max_bytes == 0 or split is None or index is None or len(index) == 0 or bool((index < 0).any()):
            return compute()
        st = self.rows.setdefault(split, {})
        ids = index.tolist()
        if all(i in st for i in ids):
            rows = [st[i] for i in ids]
            if valid is None or all(valid(b, r) for b, r in enumerate(rows)):
                self.hits += 1
                return rows
        self.misses += 1
        rows = compute()
        for i, row in zip(ids, rows):
            size = sum(t.numel() * t.element_size() for t in row.values())
            if size and self.used + size <= self.budget(next(iter(row.values())).device):
                self.used += size - sum(t.numel() * t.element_size() for t in st.get(i, {}).values())
                st[i] = row
        return rows


def unstack(batched: dict[Any, torch.Tensor]) -> list[Row]:
    """{key: [B, ...]} -> B rows {key: [...]} (copies, so a row does not hold its batch's storage)."""
    B = next(iter(batched.values())).shape[0] if batched else 0
    return [{k: v[b].clone() for k, v in batched.items()} for b in range(B)]


def stack(rows: Sequence[Row]) -> dict[Any, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}


@torch.no_grad()
def prefix_rows(model, batch: PromptBatch, until: torch.Tensor) -> list[Row]:
    """Per prompt b, the unpatched K/V of positions < until[b] at every layer, and those positions' token ids:
    {("k", layer): [G, until_b, D], ("v", layer): ..., "ids": [until_b]}. One forward of the batch's first
    max(until) positions."""
    arch = LlamaFamily.of(model)
    s = int(until.max())
    cache = output_cache(arch.base.model(**{k: v[:, :s] for k, v in batch.model_inputs().items()}, use_cache=True))
    return [{"ids": batch.input_ids[b, :u].clone(), **_kv_row(cache, b, u)} for b, u in enumerate(until.tolist())]


@torch.no_grad()
def unpatched_rows(model, batch: PromptBatch) -> list[Row]:
    """One plain forward giving, per prompt, its last-position logits ("logits" [V]), its token ids ("ids" [T])
    and the K/V of every position before `last` (a prefix for any patch at or after it)."""
    arch = LlamaFamily.of(model)
    out = arch.base.model(**batch.model_inputs(), use_cache=True)
    last = batch.roles["last"]
    b = torch.arange(last.shape[0], device=last.device)
    logits = arch.lm_head(out.last_hidden_state[b, last])
    cache = output_cache(out)
    return [{"ids": batch.input_ids[i].clone(), "logits": logits[i].clone(), **_kv_row(cache, i, int(last[i]))}
            for i in range(len(batch))]


def row_logits(rows: Sequence[Row]) -> torch.Tensor:
    """[B, V] the unpatched last-position logits of `unpatched_rows`."""
    return torch.stack([r["logits"] for r in rows])


def _kv_row(cache, b: int, n: int) -> Row:
    row: Row = {}
    for j, lay in enumerate(cache.layers):
        row[("k", j)], row[("v", j)] = lay.keys[b, :, :n].clone(), lay.values[b, :, :n].clone()
    return row


def kv_length(row: Row) -> int:
    return row[("k", 0)].shape[-2]


def earliest(batch: PromptBatch, roles: Sequence[str]) -> torch.Tensor:
    """[B] the first position any of `roles` occupies in each prompt (where a patch at those roles starts); `last`
    when there is no role (an empty head set patches nothing)."""
    if not roles:
        return batch.roles["last"]
    return torch.stack([batch.roles[r] for r in roles]).min(0).values


def split_position(batch: PromptBatch, until: torch.Tensor, min_prefix: float = 0.25) -> int:
    """Where the split forward of `batch` starts: s = min(until), or 0 (one plain forward) when the prefix would
    hold fewer than `min_prefix` of the batch's positions, as when the earliest patch is early in the context (the
    Structure Reader's label): computing and storing so short a prefix costs more than it saves. A function of the
    batch alone, so a cached and an uncached run make the same choice."""
    s = int(until.min())
    return s if s >= 1 and s >= min_prefix * batch.input_ids.shape[1] else 0


def per_row_split(model, batch: PromptBatch, patches: Sequence[Patch], until: torch.Tensor,
                  rows: list[Row]) -> torch.Tensor:
    """[B, V] = `patched_last_logits(..., rows=rows)`, with each group of rows of one first patched position split
    there (not all at the batch's earliest: a Structure Reader label early in one prompt no longer makes every row
    recompute a long suffix). One forward per distinct position."""
    values = until.unique()  # one host read per batch
    if values.numel() == 1:
        return patched_last_logits(model, batch, patches, until, rows=rows)
    B = len(batch)
    out: torch.Tensor | None = None
    for u in values:
        idx = (until == u).nonzero()[:, 0]
        sub = [replace(p, source=p.source[idx] if p.source.shape[0] == B else p.source,
                       keep=p.keep[idx] if p.keep.shape[0] == B else p.keep,
                       pos=None if p.pos is None else p.pos[idx]) for p in patches]
        logits = patched_last_logits(model, batch.rows(idx), sub, until[idx], rows=[rows[i] for i in idx.tolist()])
        if out is None:
            out = logits.new_empty(B, logits.shape[-1])
        out[idx] = logits
    return out


def patched_last_logits(model, batch: PromptBatch, patches: Sequence[Patch], until: torch.Tensor,
                        cache: RowCache | None = None, split: str | None = None,
                        rows: list[Row] | None = None, min_prefix: float = 0.25) -> torch.Tensor:
    """[B, V] last-position logits of `batch` with `patches` (all at positions >= until[b] of row b): the unpatched
    prefix (`rows`, else from `cache` under `split`, else computed) and the suffix from `split_position` with the
    patches shifted (a plain patched forward where that is 0; given `rows`, the prefix costs nothing, so any split
    is taken). Differentiable in the patches' sources and weights; the prefix carries no gradient."""
    s = split_position(batch, until, 0 if rows is not None else min_prefix)
    if s < 1:  # nothing (worth keeping) before the first patch: a plain forward
        with hooked(model, patches=patches):
            return last_logits(model, batch)
    arch = LlamaFamily.of(model)

    def usable(b: int, row: Row) -> bool:  # holds positions < s, computed on this row's tokens
        n = kv_length(row)
        return n >= s and torch.equal(row["ids"][:n], batch.input_ids[b, :n])

    compute = lambda: prefix_rows(model, batch, until)  # noqa: E731
    if rows is None:
        rows = compute() if cache is None else cache.get(split, batch.index, compute, usable)
    elif not all(usable(b, r) for b, r in enumerate(rows)):
        raise ValueError("patched_last_logits: the given prefix rows do not cover the split position")
    L = arch.dims.n_layers
    kv = DynamicCache([(torch.stack([r[("k", j)][:, :s] for r in rows]), torch.stack([r[("v", j)][:, :s] for r in rows]))
                       for j in range(L)], config=arch.base.config)
    for p in patches:
        if p.pos is None or bool((p.pos < s).any()):
            raise ValueError("patched_last_logits: every patch needs explicit positions >= the split position")
    shifted = [replace(p, pos=p.pos - s) for p in patches]
    with hooked(model, patches=shifted):
        hid = arch.base.model(input_ids=batch.input_ids[:, s:], attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids[:, s:], use_cache=True, **cache_kwargs(model, kv)).last_hidden_state
    b = torch.arange(hid.shape[0], device=hid.device)
    return arch.lm_head(hid[b, batch.roles["last"] - s])
