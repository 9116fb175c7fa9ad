"""Metrics: per-example correctness kept (so any interval can be computed), accuracy with a 95% interval."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for tables and messages; `n/a` for an undefined (None or NaN) value."""
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_ci(correct: torch.Tensor | None = None, k: int | None = None, n: int | None = None) -> dict[str, float | int | None]:
    """Accuracy with its 95% Wilson interval: from per-example correctness [N], or from counts k of n. The one
    definition every method's accuracy rows use; no prompts -> accuracy None (never a division by zero)."""
    if correct is not None:
        n, k = int(correct.numel()), int(correct.sum().item())
    assert k is not None and n is not None
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n if n else None, "ci_low": lo if n else None, "ci_high": hi if n else None, "n": n}


def quantile_ci(samples: torch.Tensor) -> tuple[float, float]:
    """The 2.5% and 97.5% quantiles of bootstrap (or random-draw) samples [S]: a 95% interval."""
    lo, hi = torch.quantile(samples.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Rank correlation of two score vectors [N] (None with fewer than 3 values or no spread in either)."""
    if a.numel() < 3:
        return None
    ra, rb = a.double().argsort().argsort().double(), b.double().argsort().argsort().double()
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def bootstrap_ratio(num: torch.Tensor, den: torch.Tensor, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95% interval of mean(num)/mean(den): example indices resampled jointly for both."""
    g = torch.Generator().manual_seed(seed)
    n = num.shape[0]
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    r = num.double()[idx].mean(1) / den.double()[idx].mean(1).clamp_min(1e-12)
    return quantile_ci(r)


def share_of_gap(patched: torch.Tensor, target: torch.Tensor, source: torch.Tensor, n_boot: int = 2000,
                 seed: int = 0) -> dict[str, float | None]:
    """How far patching moves the target model's accuracy toward the source model's, as a share of their gap:
    (acc(patched) - acc(target)) / (acc(source) - acc(target)), with a paired bootstrap 95% interval (the same
    resampled prompts for all three). Per-prompt correctness [N] on the SAME prompts. None when the gap is 0."""
    if not (patched.shape == target.shape == source.shape):
        raise ValueError("share of gap needs the three correctness vectors on the same prompts")
    p, t, s = (x.double() for x in (patched, target, source))
    gap = float(s.mean() - t.mean())
    if gap == 0:
        return {"share": None, "ci_low": None, "ci_high": None, "gap": 0.0,
                "reason": "the two models are equally accurate on these prompts: there is no gap to share"}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, p.shape[0], (n_boot, p.shape[0]), generator=g)
    num, den = p[idx].mean(1) - t[idx].mean(1), s[idx].mean(1) - t[idx].mean(1)
    lo, hi = quantile_ci((num / den)[den != 0])
    return {"share": float(p.mean() - t.mean()) / gap, "ci_low": lo, "ci_high": hi, "gap": gap}


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over all processes (itself with one process). For sums over a predict loop's shards: Lightning's
    predict sampler gives every example to exactly one process, so the sum is the one-process sum."""
    if world_size() == 1:
        return t
    import torch.distributed as dist

    out = t.detach().clone().to(torch.float64 if t.is_floating_point() else t.dtype)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.dtype)


def _cat(state) -> torch.Tensor:
    """A per-example state as one tensor, whether still a list of batch rows or already synced into one."""
    if isinstance(state, torch.Tensor):
        return state
    return dim_zero_cat(state) if state else torch.zeros(0)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean of `values` [B] over the rows of the one-process batch, computed from this process's share: rows of
    weight 0 (`Repeat`s) left out, scaled so that DDP's average of the processes' gradients is the one-process
    gradient. With one process (nothing repeated) it is `values.mean()`."""
    W = world_size()
    if W == 1 or weight is None:
        return values.mean()
    w = weight.to(values.dtype)
    return (values * w).sum() * W / all_sum(w.sum().detach())


class ExampleMetric(Metric):
    """Per-example states keyed by dataset index: `gathered(*states)` returns them from every process, in dataset
    order, each example once (the distributed sampler's repeats dropped). States are [N, ...] rows."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def _add_index(self, index: torch.Tensor | None, n: int, device) -> None:
        self.index.append(index.to(device) if index is not None else torch.full((n,), -1, dtype=torch.long, device=device))

    def gathered(self, *names: str) -> list[torch.Tensor]:
        if isinstance(self.index, list) and not self.index and world_size() == 1:
            return [torch.zeros(0) for _ in names]
        # inside compute() torchmetrics has already synced the states (lists -> one tensor): sync only when not
        with self.sync_context(should_sync=world_size() > 1 and not self._is_synced, should_unsync=True):
            idx = _cat(self.index).long()
            vals = [_cat(getattr(self, n)) for n in names]
        if (idx < 0).any():  # batches without indices (built by hand): keep them as they came
            return vals
        order = torch.argsort(idx, stable=True)
        idx = idx[order]
        first = torch.ones_like(idx, dtype=torch.bool)
        first[1:] = idx[1:] != idx[:-1]
        return [v[order][first] for v in vals]


def mean_ci(values: torch.Tensor) -> dict[str, float | int | None]:
    """Mean with its 95% normal interval (mean +- 1.96 sd / sqrt(n)); None values for no data."""
    n = int(values.numel())
    if n == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    v = values.double()
    mean = float(v.mean())
    half = 1.959964 * float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


class PerExample(ExampleMetric):
    """Named per-example rows [B, ...] kept per process and gathered in dataset order (`gathered(name)`): for methods
    that keep raw per-prompt values (attention shares, patched predictions) rather than a score."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.names = names
        for n in names:
            self.add_state(n, default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor | None, **rows: torch.Tensor) -> None:
        n = None
        for name, v in rows.items():
            getattr(self, name).append(v)
            n = len(v)
        self._add_index(index, int(n or 0), next(iter(rows.values())).device)

    def compute(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.gathered(*self.names)))


class LogitDifference(ExampleMetric):
    """Per-example logit(answer) - logit(distractor) at the last position (IOI: IO - S), for prompts with a
    distractor; gathered in dataset order."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("diff", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor, distractor: torch.Tensor | None,
               index: torch.Tensor | None = None) -> None:
        if distractor is None:
            return
        ok = distractor >= 0  # [B]
        rows = logits[ok].float()  # [b, V]
        d = rows.gather(-1, target[ok][:, None])[:, 0] - rows.gather(-1, distractor[ok][:, None])[:, 0]
        self.diff.append(d)
        self._add_index(None if index is None else index[ok], int(ok.sum()), target.device)

    def per_example(self) -> torch.Tensor:
        return self.gathered("diff")[0]

    def compute(self) -> dict[str, float | int | None]:
        return mean_ci(self.per_example())


class TaskAccuracy(ExampleMetric):
    """Top-1 accuracy of the answer token; keeps per-example correctness, gathered in dataset order."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> None:
        self.correct.append((logits.argmax(-1) == target).to(torch.float32))  # logits [B, V], target [B]
        self._add_index(index, len(target), target.device)

    def per_example(self) -> torch.Tensor:
        return self.gathered("correct")[0]

    def compute(self) -> dict[str, float]:
        return accuracy_ci(self.per_example())
