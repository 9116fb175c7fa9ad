"""PNG figures: layer x head heatmaps with highlighted heads, and line plots."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    from etk.artifacts import is_main_process

    fig.tight_layout()
    path = Path(path)
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def head_heatmap(scores: torch.Tensor, path: str | Path, title: str, highlight: Sequence[tuple[int, int]] = ()) -> Path:
    """[layer, head] scores; diverging colours centred at 0 (negative = important), or a sequential map when no value
    is negative (sizes of a change); highlighted heads boxed."""
    s = scores.detach().float().cpu()
    vmax = float(s.nan_to_num(0.0).abs().max()) or 1.0
    L, H = s.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * H + 2), max(3, 0.22 * L + 1.5)))
    sequential = bool((s.nan_to_num(0.0) >= 0).all())
    im = ax.imshow(s, cmap="Blues" if sequential else "RdBu", vmin=0 if sequential else -vmax, vmax=vmax,
                   aspect="auto", origin="lower")
    for layer, head in highlight:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="value" if sequential else "score")
    return _save(fig, path)


def line_plot(xs: Sequence[float], series: dict[str, Sequence[float]], path: str | Path, title: str,
              xlabel: str, ylabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def scatter_plot(xs: Sequence[float], ys: Sequence[float], kinds: Sequence[str], path: str | Path, title: str,
                 xlabel: str, ylabel: str) -> Path:
    """Points coloured by kind, with the diagonal y = x."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for kind in dict.fromkeys(kinds):
        pts = [(x, y) for x, y, k in zip(xs, ys, kinds) if k == kind]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, label=kind)
    lo = min([*xs, *ys, 0.0])
    hi = max([*xs, *ys, 0.0])
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def matrix_heatmap(values: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], path: str | Path,
                   title: str) -> Path:
    """A small annotated matrix (e.g. faithfulness of each circuit on each model)."""
    v = torch.tensor(values, dtype=torch.float32)
    fig, ax = plt.subplots(figsize=(1.8 * len(cols) + 2.5, 0.8 * len(rows) + 1.8))
    im = ax.imshow(v, cmap="viridis", vmin=0, vmax=max(1.0, float(v.nan_to_num(0).max())))
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{float(v[i, j]):.2f}", ha="center", va="center", color="white")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def mask_plot(values: torch.Tensor, names: Sequence[str], path: str | Path, title: str) -> Path:
    """Horizontal bars of a mask (heads as rows); values <= 0.5 (selected) in red."""
    v = values.detach().float().cpu().clamp(-0.2, 1.2)
    fig, ax = plt.subplots(figsize=(5, 0.25 * len(names) + 1.2))
    ax.barh(range(len(names)), v, color=["tab:red" if x <= 0.5 else "tab:gray" for x in v.tolist()])
    ax.set_yticks(range(len(names)), names)
    ax.axvline(0.5, color="black", lw=0.8, ls="--")
    ax.set_xlabel("mask (1 = keep base, 0 = patch source)")
    ax.set_title(title)
    return _save(fig, path)


def curve_plot(curves: dict[str, dict], path: str | Path, title: str) -> Path:
    """Faithfulness vs circuit size (log x) for one or more models' `curve.json` documents: 95% CI bands, each
    model's all-heads reference (dashed) and random circuits of the same sizes (dotted)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [100 * p["fraction"] for c in curves.values() for p in c["points"]]
    for i, (name, c) in enumerate(curves.items()):
        col = f"C{i}"
        pts = [p for p in c["points"] if p["faithfulness"] is not None]
        x = [100 * p["fraction"] for p in pts]
        ax.plot(x, [p["faithfulness"] for p in pts], marker="o", ms=3, color=col, label=name)
        if all(p["ci_low"] is not None for p in pts):
            ax.fill_between(x, [p["ci_low"] for p in pts], [p["ci_high"] for p in pts], color=col, alpha=0.15)
        rnd = [p.get("random_faithfulness_mean") for p in pts]
        if all(r is not None for r in rnd):
            ax.plot(x, rnd, ls=":", color=col, label=f"{name}: random circuits")
        if c.get("all_heads", {}).get("faithfulness") is not None:
            ax.axhline(c["all_heads"]["faithfulness"], ls="--", lw=1, color=col, label=f"{name}: all heads at the circuit's positions")
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xscale("log")
    if xs:
        ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
    ax.set_xlabel("circuit size (% of the model's heads per group)")
    ax.set_ylabel("faithfulness F(C)/F(M)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def role_head_heatmap(keep: torch.Tensor, present: torch.Tensor, path: str | Path, title: str) -> Path:
    """A position-aware circuit: kept heads per role (rows: the roles present) x layer (columns), as counts."""
    from etk.data.roles import ROLE_VOCAB

    rows = present.nonzero()[:, 0].tolist()
    counts = keep[rows].sum(-1).float()  # [roles, L]
    fig, ax = plt.subplots(figsize=(max(5, 0.22 * counts.shape[1] + 2.5), max(3, 0.28 * len(rows) + 1.2)))
    im = ax.imshow(counts, cmap="Blues", aspect="auto", vmin=0, vmax=max(1, keep.shape[-1]))
    ax.set_yticks(range(len(rows)), [ROLE_VOCAB[r] for r in rows], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="heads kept")
    return _save(fig, path)
