"""`method=model_diff pair=<p>`: what fine-tuning changed, head by head, beside where the gain is (CMAP).

Writes `results.json` (schema `etk.model_diff/v1`; every array with its axes), heatmaps (layer x head) of the weight
deltas, the activation deltas at the circuit's positions and the DLA change, and a per-group ranking that sets these
deltas beside the CMAP share of the gain: do the heads that changed most carry the gain?"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from etk.artifacts import named
from etk.circuits import circuit_spec, load_circuit
from etk.data.datasets import prompt_loader
from etk.data.roles import MEMBERS
from etk.methods.model_diff.module import ModelDiffModule
from etk.methods.model_diff.weights import weight_deltas
from etk.metrics import spearman
from etk.models.arch import LlamaFamily
from etk.models.pair import load_pair
from etk.report.plots import head_heatmap
from etk.results import CMAPResult, ModelDiffResult
from etk.runtime import data_config, emit, make_trainer, output_dir, plain_config, run_logger
from etk.tasks import Task, collapsed_roles, task_of


def percentile_of(values: torch.Tensor, among: torch.Tensor) -> float:
    """Mean percentile (0-100) of `values` among the finite entries of `among` (share strictly below + half ties)."""
    pool = among[torch.isfinite(among)].flatten()
    if pool.numel() == 0 or values.numel() == 0:
        return float("nan")
    below = (pool[None] < values[:, None]).double().mean(1) + 0.5 * (pool[None] == values[:, None]).double().mean(1)
    return float(100 * below.mean())


def group_ranking(task: Task, w: dict[str, torch.Tensor], act: torch.Tensor, dla_change: torch.Tensor, circuit,
                  cmap: CMAPResult | None) -> list[dict[str, Any]]:
    """Per circuit group: how much its heads changed (weights, z at the group's position, DLA) as raw means and as
    percentiles among all heads, beside the share of the gain CMAP found in that group."""
    rows, diff_rows = [], collapsed_roles()
    for g in task.group_names:
        heads = [tuple(h) for h in (circuit.groups.get(g, []) if circuit else [])]
        if not heads:
            continue
        li = torch.tensor([h[0] for h in heads])
        hi = torch.tensor([h[1] for h in heads])
        role = diff_rows.index(task.group_role[g])
        a = act[role]  # [L, H]
        row = {"group": g, "n_heads": len(heads), "role": task.group_role[g],
               "weight_delta": float(w["head"][li, hi].mean()), "weight_percentile": percentile_of(w["head"][li, hi], w["head"]),
               "activation_delta": float(a[li, hi].mean()), "activation_percentile": percentile_of(a[li, hi], a),
               "dla_change": float(dla_change[li, hi].mean()), "dla_percentile": percentile_of(dla_change[li, hi], dla_change)}
        r = cmap.results.get(g) if cmap is not None else None
        if r is not None:
            row["cmap_share_of_gap"] = r.get("share_of_gap")
            row["cmap_accuracy"] = r.get("accuracy")
        rows.append(row)
    return rows


def spearman_rho(x: list[float], y: list[float]) -> float | None:
    """Rank correlation of two short lists (None with fewer than 3 pairs or no spread)."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return None
    r = spearman(torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs]))
    return None if r is None or not math.isfinite(float(r)) else float(r)


def top_changed(task: Task, act_last: torch.Tensor, circuit, k: int) -> dict[str, Any]:
    """The k heads whose z changed most at `last`, and how many of them are circuit heads acting there, against the
    circuit's share of all heads (enrichment 1 = no more than chance)."""
    L_, H = act_last.shape
    flat = torch.nan_to_num(act_last.flatten(), nan=-1.0)
    k = min(k, flat.numel())
    idx = torch.topk(flat, k).indices
    heads = [(int(i) // H, int(i) % H) for i in idx]
    at_last = {tuple(h) for g in task.groups_at("last") for h in (circuit.groups.get(g, []) if circuit else [])}
    hits = sum(h in at_last for h in heads)
    chance = len(at_last) / (L_ * H) if at_last else 0.0
    return {"role": "last", "k": k, "heads": [list(h) for h in heads], "in_circuit": hits,
            "enrichment": (hits / k) / chance if chance and k else None}


def run_model_diff(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.method
    L.seed_everything(cfg.seed, verbose=False)
    base_cfg, ft_cfg = (OmegaConf.to_container(cfg.pair[k], resolve=True) for k in MEMBERS)
    toggle = bool(m.get("toggle_adapter", True))
    task, DIFF_ROLES = task_of(cfg), collapsed_roles()
    module = ModelDiffModule(base_cfg, ft_cfg, toggle, load_pair(base_cfg, ft_cfg, toggle))
    examples = task.examples(data_config(cfg, m.n_examples), module.tokenizer)
    module.pair.check([task.text(e) for e in examples[:50]])
    spec = circuit_spec(cfg, cfg.pair.finetuned.get("circuit"))  # the fine-tuned circuit, as CMAP patches
    circuit = load_circuit(spec) if spec else None
    cmap = CMAPResult.load(m.cmap_run) if m.get("cmap_run") else None
    out = output_dir()
    with run_logger(cfg) as logger:
        trainer = make_trainer(cfg, "model diff: prompt batches")
        trainer.predict(module, prompt_loader(task, module.tokenizer, examples, int(m.batch_size), cfg.data.padding_side),
                        return_predictions=False)
        t = module.gathered()
        w = weight_deltas(module.base_net, module.ft_net, module.pair.toggled)
        dims = LlamaFamily.of(module.base_net).dims
        dla_diff = t["dla_finetuned"] - t["dla_base"]
        plots = {"weight_delta_head.png": (w["head"], "relative weight change per head (W_Q, W_K, W_V, W_O)"),
                 "dla_diff.png": (dla_diff, "DLA to the answer: fine-tuned - base")}
        for r in task.scalar_roles:
            i = DIFF_ROLES.index(r)
            if float(t["tokens"][i]) > 0:
                plots[f"activation_delta_{r}.png"] = (t["rel"][i], f"||z_ft - z_base|| / ||z_base|| at {r}")
        highlight = [tuple(h) for hs in (circuit.groups.values() if circuit else []) for h in hs]
        for name, (values, title) in plots.items():
            head_heatmap(values, out / "heatmaps" / name, f"{cfg.pair.name}: {title}", highlight)
        present = [i for i in range(len(DIFF_ROLES)) if float(t["tokens"][i]) > 0]
        roles = [DIFF_ROLES[i] for i in present]
        ranking = group_ranking(task, w, t["rel"], t["dla_abs_diff"], circuit, cmap)
        shares = [((r.get("cmap_share_of_gap") or {}).get("share")) for r in ranking]
        gains = [(share, r["group"]) for share, r in zip(shares, ranking) if share is not None]
        verdict = {
            "rho_activation_vs_gain": spearman_rho([r["activation_delta"] for r in ranking], shares),
            "rho_weight_vs_gain": spearman_rho([r["weight_delta"] for r in ranking], shares),
            "most_changed_group": max(ranking, key=lambda r: r["activation_percentile"])["group"] if ranking else None,
            "largest_gain_group": max(gains, key=lambda x: x[0])[1] if gains else None,
        }
        payload = {
            "pair": cfg.pair.name, "base_model": cfg.pair.base.name, "finetuned_model": cfg.pair.finetuned.name,
            "n": int(t["prompts"]), "adapter_toggled": module.pair.toggled, "circuit": str(spec) if spec else None,
            "cmap_run": str(m.cmap_run) if m.get("cmap_run") else None,
            "weight_delta": {"head": named(w["head"], "layer", "head"), "q": named(w["q"], "layer", "head"),
                             "o": named(w["o"], "layer", "head"), "k": named(w["k"], "layer", "kv_group"),
                             "v": named(w["v"], "layer", "kv_group"), "mlp": named(w["mlp"], "layer")},
            "activation_delta": {"roles": roles, "tokens": [int(t["tokens"][i]) for i in present],
                                 "rel_norm": named(t["rel"][present], "role", "layer", "head"),
                                 "cosine": named(t["cos"][present], "role", "layer", "head")},
            "dla": {"base": named(t["dla_base"], "layer", "head"), "finetuned": named(t["dla_finetuned"], "layer", "head"),
                    "diff": named(dla_diff, "layer", "head"), "mean_abs_diff": named(t["dla_abs_diff"], "layer", "head")},
            "logit_lens": {"kl_to_final": {"base": named(t["lens_base"], "layer"),
                                           "finetuned": named(t["lens_finetuned"], "layer")}},
            "token_kl": {"roles": roles, "kl_finetuned_base": [float(t["token_kl"][i]) for i in present],
                         "last": float(t["token_kl"][DIFF_ROLES.index("last")])},
            "by_group": ranking, "verdict": verdict,
            "top_changed": top_changed(task, t["rel"][DIFF_ROLES.index("last")], circuit, int(m.get("top_k", 20))),
            "heatmaps": sorted(f"heatmaps/{n}" for n in plots), "n_layers": dims.n_layers, "n_heads": dims.n_heads,
            "config": plain_config(cfg),
        }
        print(f"[etk] model_diff {cfg.pair.name} (n={payload['n']}): token KL at last {payload['token_kl']['last']:.4f}; "
              + "; ".join(f"{task.short[r['group']]} z change {r['activation_delta']:.3f} (pct {r['activation_percentile']:.0f})"
                          for r in ranking))
        return emit(ModelDiffResult.from_payload(payload), logger)
