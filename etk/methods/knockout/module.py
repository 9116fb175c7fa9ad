"""Attention knockout sweep as a Lightning predict loop: per prompt batch, every (edge, start layer) configuration
plus the unablated baseline, many configurations per forward (rows = configs x prompts)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import DynamicCache

from etk.data.roles import PromptBatch
from etk.errors import ConfigError
from etk.interventions.knockout import (
    RANDOM,
    config_rows,
    edge_positions,
    knockout,
    parse_edge,
    random_context_positions,
)
from etk.methods.base import ModelHost
from etk.methods.mean_ablation.ablation import repeat_batch
from etk.methods.mean_ablation.module import AblationAccuracy
from etk.models.arch import LlamaFamily
from etk.models.forward import assert_eval, last_logits, output_cache
from etk.models.loading import LoadedModel
from etk.models.partial import LayerInputs, forward_from_layer

BASELINE = "baseline"


class KnockoutModule(ModelHost):
    """Configurations: `baseline` (no knockout) first, then (edge, s) for each edge and start layer s.
    `self.acc.per_example()` is [K, N] correctness in the order of `self.configs()`."""

    def __init__(self, model_cfg: dict[str, Any], edges: Sequence[str], start_layers: Sequence[int] | None = None,
                 rows_per_forward: int = 256, random_seed: int = 5, start_layers_every: int = 1, model: LoadedModel | None = None,
                 scalar_roles: Sequence[str] | None = None, paper_compat: bool = False, reference: bool = False):
        super().__init__(model_cfg, model)
        self.every = max(1, int(start_layers_every))
        for e in edges:
            parse_edge(e, scalar_roles)
        self.edges = list(edges)
        self.requested_start_layers = None if start_layers is None else [int(s) for s in start_layers]
        self.rows_per_forward = int(rows_per_forward)
        self.random_seed = int(random_seed)
        self.paper_compat = bool(paper_compat)  # the paper's random key: a new draw per (edge, start layer, prompt)
        self.reference = bool(reference)  # every position from each start layer (the check of the suffix-only path)
        self.acc = AblationAccuracy()
        self.forwards = 0
        self._tables: dict[int, torch.Tensor] = {}  # per stream, the random keys' uniforms by dataset index

    @property
    def n_layers(self) -> int:
        return LlamaFamily.of(self.net).dims.n_layers

    def start_layers(self) -> list[int]:
        """The swept start layers (default: every layer, or every `start_layers_every`-th)."""
        L = self.n_layers
        layers = list(range(0, L, self.every)) if self.requested_start_layers is None else self.requested_start_layers
        bad = [s for s in layers if not 0 <= s < L]
        if bad:
            raise ConfigError(f"start layers {bad} out of range (model has {L} layers)")
        return layers

    def configs(self) -> list[tuple[str, int]]:
        """[(edge or 'baseline', start layer)]: the baseline runs with start layer L (nothing blocked)."""
        return [(BASELINE, self.n_layers)] + [(e, s) for e in self.edges for s in self.start_layers()]

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.net)
        self.acc.reset()
        self.generator = torch.Generator().manual_seed(self.random_seed)
        self._tables = {}
        self.forwards = 0

    def uniforms(self, batch: PromptBatch, stream: int = 0) -> torch.Tensor | None:
        """[N] the random-key draw of each prompt, keyed by its dataset index: draw i of one seeded stream (what a
        sequential one-process loop draws), so every process draws the same for the same prompt. Stream 0 is shared
        by every configuration; with `paper_compat` configuration c draws from stream c. None for hand-built batches
        without indices (then drawn in batch order)."""
        idx = batch.index
        if idx is None or len(idx) == 0 or bool((idx < 0).any()):
            return None
        need = int(idx.max()) + 1
        table = self._tables.get(stream)
        if table is None or len(table) < need:  # a longer draw of the same stream keeps its prefix
            size = max(need, 0 if table is None else 2 * len(table))
            seed = self.random_seed + 100_003 * stream
            self._tables[stream] = table = torch.rand(size, generator=torch.Generator().manual_seed(seed))
        return table[idx.cpu()]

    def _positions(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query positions [K, N], key positions [K, N] and start layers [K] of every configuration."""
        needs_random = any(parse_edge(e)[1] == RANDOM for e in self.edges)
        rand = random_context_positions(batch, self.generator, self.uniforms(batch)) if needs_random else None  # [N]
        none = torch.full_like(batch.roles["last"], -1)  # [N]
        pos = {BASELINE: (none, none), **{e: edge_positions(batch, e, rand) for e in self.edges}}
        cfgs = self.configs()
        per_cfg = [pos[e] for e, _ in cfgs]
        if self.paper_compat:  # the paper draws the random key anew for every (edge, start layer, prompt)
            per_cfg = [edge_positions(batch, e, random_context_positions(batch, self.generator, self.uniforms(batch, c)))
                       if e != BASELINE and parse_edge(e)[1] == RANDOM else pos[e] for c, (e, _) in enumerate(cfgs)]
        q = torch.stack([p[0] for p in per_cfg])  # [K, N]
        k = torch.stack([p[1] for p in per_cfg])  # [K, N]
        s = torch.tensor([s for _, s in cfgs], device=q.device)  # [K]
        return q, k, s

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        """Layers below a configuration's start layer compute exactly the clean run, so they are run once: one
        clean forward gives the baseline and the residual entering every start layer; each configuration then
        runs only layers s..L-1 of its rows (many configurations per forward). Blocking query q -> key k changes
        nothing at positions before q (causal attention), so only positions >= the group's earliest q are run, on
        the clean K/V of the positions before it (`reference=True`: every position, the pre-0.9 path)."""
        N, L = len(batch), self.n_layers
        arch = LlamaFamily.of(self.net)
        q, k, s = self._positions(batch)  # [K, N], [K, N], [K]
        starts = sorted(set(s.tolist()) - {L})
        with LayerInputs(arch, None, starts) as h:  # {s: [N, T, d]}
            if self.reference:
                clean, cache = last_logits(self.net, batch), None
            else:
                out = arch.base.model(**batch.model_inputs(), use_cache=True)
                clean = arch.lm_head(out.last_hidden_state[torch.arange(N, device=q.device), batch.roles["last"]])
                cache = output_cache(out)  # the clean K/V of every layer [N, G, T, D]
        self.forwards += 1
        correct = torch.empty(q.shape[0], N, dtype=torch.bool, device=q.device)  # [K, N]
        correct[s == L] = clean.argmax(-1) == batch.answer
        per = max(1, self.rows_per_forward // N)  # configurations per forward
        cfgs = self.configs()
        for start in starts:
            idx = (s == start).nonzero()[:, 0]
            groups = ([idx] if self.reference else  # configurations whose query role is the same share a suffix
                      [idx[[parse_edge(cfgs[i][0])[0] == role for i in idx.tolist()]]
                       for role in dict.fromkeys(parse_edge(cfgs[i][0])[0] for i in idx.tolist())])
            for group in groups:
                for c0 in range(0, group.shape[0], per):
                    it = group[c0:c0 + per]
                    logits = self.knocked_logits(batch, q[it], k[it], s[it], start, h[start], cache)
                    correct[it] = (logits.argmax(-1) == batch.answer.repeat(it.shape[0])).view(it.shape[0], N)
                    self.forwards += 1
        self.acc.update(correct, None, batch.index)
        return correct

    def knocked_logits(self, batch: PromptBatch, q: torch.Tensor, k: torch.Tensor, s: torch.Tensor, start: int,
                       h: torch.Tensor, cache) -> torch.Tensor:
        """[n_cfg * N, V] last-position logits (row c*N + n) of n_cfg configurations (query/key positions q, k
        [n_cfg, N], start layers s) from layer `start`, whose clean input residual is h [N, T, d]. With the clean K/V
        `cache` (None: every position), only positions >= p run, p = the earliest blocked query of these rows (their
        residuals at p.. enter layer `start` clean, and the positions before p keep their clean K/V)."""
        n_cfg, N = q.shape
        arch = LlamaFamily.of(self.net)
        rows = repeat_batch(batch, n_cfg)  # [n_cfg * N] rows, row c*N + n
        real = q[q >= 0]
        p = 0 if cache is None or real.numel() == 0 else int(real.min())  # one host read per forward
        prefix = None
        if p > 0:
            kv = [(lay.keys[:, :, :p].repeat(n_cfg, 1, 1, 1), lay.values[:, :, :p].repeat(n_cfg, 1, 1, 1))
                  for lay in cache.layers[start:]]
            # layers below `start` are not run: their entries (the start layer's, not copied) only give the length
            prefix = DynamicCache([kv[0]] * start + kv, config=arch.base.config)
        with knockout(self.net, *config_rows(q, k, s)):
            hid = forward_from_layer(self.net, h[:, p:].repeat(n_cfg, 1, 1), start, rows.attention_mask,
                                     rows.position_ids[:, p:], prefix)  # [R, T - p, d], final-normed
        return arch.lm_head(hid[torch.arange(hid.shape[0], device=hid.device), rows.roles["last"] - p])
