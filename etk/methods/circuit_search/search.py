"""Position-aware circuit search: circuits whose units are (position role, layer, head) for every token role of the
prompt (`etk.data.roles.ROLE_VOCAB`), not only the paper's three vital positions.

1. Score every unit. Exact mean-ablation effects where affordable (`exact_max_units`: the drop in the answer's
   log-probability when that unit alone is mean-ablated from the full model), otherwise attribution: integrated
   gradients of the answer's log-probability along the straight path from "everything mean-ablated" to "nothing
   ablated" (z = m * z + (1 - m) * mean with one scalar m per (token, layer, head), summed over each unit's tokens;
   one forward + one backward per step; `steps=1` evaluates at m = 1, i.e. plain attribution patching).
2. Grow: evaluate the circuit plus the top-n remaining units for a log-spaced grid of n (one batch of ablations),
   keep the smallest addition reaching `target` faithfulness on the search split (or the best one), re-rank the
   remaining units given the grown circuit (attribution along the path from the circuit to the full model) and
   repeat until the target is reached or a round stops improving.
3. Prune: drop chunks of the circuit's units (the rankings' tails first) while faithfulness stays at the target.
4. Report faithfulness on held-out prompts (the caller's job).

Attribution is never trusted silently: `verify` compares it with exact effects on a subset of units."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import lightning as L
import torch

from etk.circuits import Circuit
from etk.data.roles import ROLE_VOCAB, PromptBatch
from etk.interventions.hooks import hooked
from etk.methods.mean_ablation.ablation import Ablation, ablation_patches, empty_keep
from etk.methods.base import hold_unregistered, place_model
from etk.metrics import all_sum
from etk.models.arch import Dims
from etk.models.forward import last_logits

Evaluate = Callable[[list[Ablation]], torch.Tensor]  # K ablations -> [K, N] correctness


class UnitAttribution(L.LightningModule):
    """Predict loop over prompts: integrated-gradient attribution of every (role, layer, head) unit to the answer's
    log-probability, summed over prompts ([R, L, H]), and the token count of each role (which roles exist).

    Runs on a model (and means) it is given, with `Trainer(inference_mode=False)`. `base` [R, L, H] bool is the
    path's start (default: everything ablated); the path ends at the full model."""

    def __init__(self, net, means: torch.Tensor, steps: int = 4, base: torch.Tensor | None = None):
        super().__init__()
        hold_unregistered(self, "net", net)  # never moved by Lightning's teardown (see ModelHost)
        self.means, self.steps, self.base = means, int(steps), base
        self.total: torch.Tensor | None = None
        self.role_tokens: torch.Tensor | None = None
        self.n = 0

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch.to(device)

    def on_predict_start(self) -> None:
        place_model(self.net, self.device)

    def on_predict_epoch_start(self) -> None:
        self.total, self.role_tokens, self.n = None, None, 0

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> None:
        R, Lr, H = len(ROLE_VOCAB), self.means.shape[0], self.means.shape[2]
        B, T = batch.input_ids.shape
        dev = batch.input_ids.device
        tr = batch.token_roles.clamp_min(0)  # [B, T]
        real = batch.token_roles >= 0
        start = (torch.zeros(B, T, Lr, H, device=dev) if self.base is None
                 else self.base.to(dev).float()[tr])  # [B, T, L, H] value of m at the path's start
        alphas = [1.0] if self.steps == 1 else [(i + 0.5) / self.steps for i in range(self.steps)]
        means = self.means.to(dev)
        grad_sum = torch.zeros(B, T, Lr, H, device=dev)
        with torch.enable_grad():
            for a in alphas:
                m = (start + a * (1 - start)).detach().requires_grad_(True)  # [B, T, L, H]
                with hooked(self.net, patches=ablation_patches(means, m)):
                    logits = last_logits(self.net, batch)
                lp = logits.float().log_softmax(-1).gather(1, batch.answer.clamp_min(0)[:, None]).sum()
                (g,) = torch.autograd.grad(lp, m)
                grad_sum += g
        contrib = (grad_sum / len(alphas)) * (1 - start) * real[..., None, None]  # IG: path length x mean gradient
        total = torch.zeros(R, Lr, H, device=dev).index_add_(0, tr.flatten(), contrib.flatten(0, 1))
        count = torch.zeros(R, device=dev).index_add_(0, tr.flatten(), real.flatten().float())
        self.total = total.cpu() if self.total is None else self.total + total.cpu()
        self.role_tokens = count.cpu() if self.role_tokens is None else self.role_tokens + count.cpu()
        self.n += B

    def scores(self) -> torch.Tensor:
        """[R, L, H] mean attribution per prompt, over every process's prompts."""
        n = float(all_sum(torch.tensor(float(self.n), dtype=torch.float64)))
        return (all_sum(self.total.double()) / max(1.0, n)).float()

    def tokens_per_role(self) -> torch.Tensor:
        """[R] how many tokens of each role the prompts hold (every process)."""
        return all_sum(self.role_tokens)


def units_of(keep: torch.Tensor) -> list[tuple[str, int, int]]:
    """The (role, layer, head) units of an [R, L, H] keep mask, in role-vocabulary order."""
    return [(ROLE_VOCAB[r], layer, h) for r, layer, h in keep.nonzero().tolist()]


def circuit_from_keep(keep: torch.Tensor, meta: dict[str, Any]) -> Circuit:
    """A position-aware circuit: one entry per role, heads in (layer, head) order."""
    groups: dict[str, list] = {}
    for role, layer, h in units_of(keep):
        groups.setdefault(role, []).append([layer, h])
    return Circuit(groups, meta)


def exact_removal_effects(evaluate_logp: Callable[[list[Ablation]], torch.Tensor], base: Ablation,
                          units: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """[len(units)] mean log-prob drop when each flat unit index is mean-ablated from `base` (one batch)."""
    abls = [base]
    for u in units:
        keep = base.keep.clone()
        keep.view(-1)[u] = False
        abls.append(Ablation(keep, f"-{u}", base.vital))
    lp = evaluate_logp(abls).mean(1)  # [1 + n]
    return lp[0] - lp[1:]


@dataclass
class SearchTrace:
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per growth round: the sizes tried and their F
    prune: list[dict[str, float]] = field(default_factory=list)
    evaluations: int = 0


Rank = Callable[[torch.Tensor], torch.Tensor]  # keep [R, L, H] -> flat indices of the units to add, best first


GRID_CHUNK = 4  # growth-grid sizes evaluated per call when the grid is evaluated lazily


def log_grid(n: int, points: int) -> list[int]:
    """About `points` log-spaced integers in [1, n]."""
    if n < 1:
        return []
    return sorted({max(1, min(n, round(math.exp(x)))) for x in torch.linspace(0, math.log(n), points).tolist()})


def grow_and_prune(evaluate: Evaluate, rank: Rank, dims: Dims, acc_model: float, target: float, max_units: int,
                   grid_points: int = 14, grow_rounds: int = 3, refine_points: int = 3, prune_chunks: int = 8,
                   prune_rounds: int = 4, vital: Sequence[str] = (), lazy_grid: bool = True
                   ) -> tuple[torch.Tensor, float, SearchTrace]:
    """Greedy growth then pruning of a position-aware circuit; returns its keep mask [R, L, H], its faithfulness on
    the search prompts and the trace.

    Each growth round ranks the units not yet in the circuit (`rank`, given the current circuit), evaluates the
    circuit plus the top-n of them for a log-spaced grid of n in one batch (sizes up to `max_units` in all), and
    keeps the smallest addition reaching `target`, else the best one (refined between grid points); rounds stop
    at the target or when a round does not improve. Pruning then removes chunks of units (the ranking's
    tail first) as long as faithfulness stays at min(target, reached). `vital`: the task's vital roles (circuits
    keeping units only there are evaluated on the exact vital-only path). `lazy_grid`: a round's grid is evaluated
    in ascending chunks of GRID_CHUNK sizes, stopping at the first chunk that reaches the target (the sizes above
    it decide nothing: the smallest size reaching the target is kept), so they are left out of the trace; False
    evaluates the whole grid (the reference)."""
    shape = (len(ROLE_VOCAB), dims.n_layers, dims.n_heads)
    trace = SearchTrace()

    def faith(keeps: list[torch.Tensor]) -> list[float]:
        acc = evaluate([Ablation(k, vital=tuple(vital)) for k in keeps]).mean(1)
        trace.evaluations += len(keeps)
        return [float(a) / acc_model for a in acc]

    def plus(keep: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        k = keep.clone().view(-1)
        k[units] = True
        return k.view(shape)

    keep, f_cur = empty_keep(dims), 0.0
    order_all: list[int] = []
    for r in range(1 + grow_rounds):
        order = rank(keep)
        room = max_units - int(keep.sum())
        sizes = log_grid(min(len(order), room), grid_points)
        if not sizes:
            break
        fs = []
        for c0 in range(0, len(sizes), GRID_CHUNK if lazy_grid else len(sizes)):
            fs += faith([plus(keep, order[:n]) for n in sizes[c0:c0 + (GRID_CHUNK if lazy_grid else len(sizes))]])
            if max(fs) >= target:
                break
        sizes = sizes[:len(fs)]
        tried = list(zip(sizes, fs))
        ok = [i for i, f in enumerate(fs) if f >= target]
        if ok:
            i = ok[0]
            lo, (n_new, f_new) = (sizes[i - 1] if i else 0), (sizes[i], fs[i])
            mids = sorted({lo + (n_new - lo) * (j + 1) // (refine_points + 1) for j in range(refine_points)} - {lo, n_new})
            if mids:
                fm = faith([plus(keep, order[:n]) for n in mids])
                tried += list(zip(mids, fm))
                n_new, f_new = min(((n, f) for n, f in zip(mids + [n_new], fm + [f_new]) if f >= target))
        else:
            i = max(range(len(fs)), key=lambda i: (fs[i], -sizes[i]))
            n_new, f_new = sizes[i], fs[i]
            nb = [n for n in (sizes[i - 1] if i else None, sizes[i + 1] if i + 1 < len(sizes) else None) if n]
            mids = sorted({(a + n_new) // 2 for a in nb} - set(sizes))
            if mids:
                fm = faith([plus(keep, order[:n]) for n in mids])
                tried += list(zip(mids, fm))
                n_new, f_new = max(((n, f) for n, f in zip(mids + [n_new], fm + [f_new])), key=lambda t: (t[1], -t[0]))
        trace.rounds.append({"round": r, "start_units": int(keep.sum()), "start_faithfulness": f_cur,
                             "tried": [{"added": n, "faithfulness": f} for n, f in sorted(tried)],
                             "added": n_new, "faithfulness": f_new})
        if f_new <= f_cur:
            break
        keep, f_cur = plus(keep, order[:n_new]), f_new
        order_all += [int(u) for u in order[:n_new]]
        if f_cur >= target:
            break
    goal = min(target, f_cur)
    kept = order_all[::-1]  # the tail of the rankings first
    chunks = max(1, prune_chunks)
    for _ in range(prune_rounds):
        if len(kept) <= 1:
            break
        size = max(1, math.ceil(len(kept) / chunks))
        parts = [kept[i:i + size] for i in range(0, len(kept), size)]
        trials = []
        for part in parts:
            k = keep.clone().view(-1)
            k[part] = False
            trials.append(k.view(shape))
        ft = faith(trials)
        j = max(range(len(parts)), key=lambda j: (ft[j], len(parts[j])))
        trace.prune.append({"units": len(kept) - len(parts[j]), "faithfulness": ft[j], "chunk": len(parts[j]),
                            "accepted": ft[j] >= goal})
        if ft[j] >= goal:
            keep, f_cur = trials[j], ft[j]
            drop = set(parts[j])
            kept = [u for u in kept if u not in drop]
        elif size == 1:
            break
        else:
            chunks *= 2
    return keep, f_cur, trace


def verify_subset(order: torch.Tensor, scores_flat: torch.Tensor, n: int, seed: int) -> list[int]:
    """Flat unit indices to check exactly: the top n//2 by score and n - n//2 drawn from the rest."""
    top = [int(u) for u in order[: n // 2]]
    rest = [int(u) for u in order[n // 2:]]
    return top + random.Random(seed).sample(rest, min(len(rest), n - len(top)))
