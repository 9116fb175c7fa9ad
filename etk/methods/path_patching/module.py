"""Path patching as a Lightning predict loop: one stage per `trainer.predict`, scores summed over batches."""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch

from etk.errors import ConfigError
from etk.interventions.components import HeadId
from etk.methods.base import ModelHost
from etk.methods.path_patching.attribution import attribution_scores
from etk.methods.path_patching.fast import StageRuns, fast_scores
from etk.methods.path_patching.naive import naive_scores
from etk.methods.path_patching.stages import PPBatch, Receivers, Stage, minimum_blocks, sender_draws
from etk.metrics import all_sum
from etk.models.forward import assert_eval
from etk.models.loading import LoadedModel

ALGORITHMS = {"fast": fast_scores, "naive": naive_scores, "attribution": attribution_scores}


class PathPatchingModule(ModelHost):
    """One stage of path patching (its receivers and senders) scored by one algorithm, as one predict loop; a
    discovery builds one module per stage and algorithm on the same loaded model."""

    def __init__(self, model_cfg: dict[str, Any], stage: Stage, receivers: Receivers | None, senders: Sequence[HeadId],
                 algorithm: str = "fast", chunk_rows: int = 4096, suffix_chunk_rows: int = 512, model: LoadedModel | None = None,
                 per_sender_draws: int | None = None, reference: bool = False, runs: StageRuns | None = None):
        super().__init__(model_cfg, model)
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown path-patching algorithm {algorithm!r}; choose from {sorted(ALGORITHMS)}")
        self.current, self.chunk = algorithm, {"chunk_rows": chunk_rows, "suffix_chunk_rows": suffix_chunk_rows}
        if algorithm == "fast":  # the exact trims; `reference` turns them off (the benchmark's and the checks' baseline)
            self.chunk.update(reuse_clean=not reference, top_last_only=not reference, runs=None if reference else runs)
        self.stage, self.receivers, self.senders = stage, receivers, list(senders)
        self.per_sender_draws = per_sender_draws  # a seed: the paper's entity per (prompt, sender) (D1); None: per pair
        self.sums: torch.Tensor | None = None
        self.n = 0
        self.cost: Counter = Counter()

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.net)

    def predict_step(self, batch: PPBatch, batch_idx: int) -> None:
        fn = ALGORITHMS[self.current]
        kw = {} if self.current == "naive" else dict(self.chunk)
        if self.per_sender_draws is not None:
            dims = self.arch.dims
            kw["draws"] = sender_draws(batch, self.stage, dims.n_layers, dims.n_heads, self.per_sender_draws)
        if self.current == "fast":
            kw["batch_idx"] = batch_idx
        s, cost = fn(self.net, batch, self.stage, self.receivers, self.senders, **kw)
        shared = cost.pop("shared_forwards", 2)  # the clean and corrupt forwards this stage ran for every stage
        cost["min_token_layer_blocks"] = minimum_blocks(batch, self.stage, self.receivers, self.senders,
                                                        self.arch.dims.n_layers, shared)
        self.sums = s.cpu() if self.sums is None else self.sums + s.cpu()
        self.n += len(batch)
        self.cost.update(cost)

    def scores(self) -> torch.Tensor:
        """[layer, head] mean relative change of the clean answer's probability, over every process's prompts whose
        clean probability is > 0 (the others, counted in `undefined_prompts`, have no relative change). NaN (written
        as null, with the reason) when no prompt has one."""
        n = all_sum(torch.tensor([float(self.n), float(self.cost["undefined_prompts"])], dtype=torch.float64))
        defined = float(n[0] - n[1])
        total = all_sum(self.sums.double())
        return (total / defined).float() if defined > 0 else torch.full_like(total, float("nan")).float()

    def total_cost(self) -> dict[str, float]:
        """The cost counters summed over every process."""
        keys = sorted(self.cost)
        vals = all_sum(torch.tensor([float(self.cost[k]) for k in keys], dtype=torch.float64)).tolist()
        out = {k: (int(v) if float(v).is_integer() else v) for k, v in zip(keys, vals)}
        if out.get("token_layer_blocks"):  # the speed-of-light line: the definition's minimum over the work done
            out["speed_of_light_pct"] = round(100 * out["min_token_layer_blocks"] / out["token_layer_blocks"], 1)
        return out
