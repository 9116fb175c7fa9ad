"""`train_dcm.py`: train a DCM mask over one circuit group, select by the paper's rule, test, write artefacts."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from etk.artifacts import save_tensor, write_json
from etk.circuits import circuit_label, resolve_circuit
from etk.data.datasets import pair_loader
from etk.interventions.components import HeadId
from etk.methods.dcm.module import DCMModule
from etk.methods.dcm.multi import DETERMINISTIC, MultiDCMModule
from etk.interventions.prefix import cache_budget
from etk.models.loading import load
from etk.report.plots import mask_plot
from etk.results import DCMResult
from etk.runtime import data_config, emit, make_trainer, output_dir, plain_config, run_device, run_logger, step_output
from etk.tasks import task_of


def dcm_loaders(cfg: DictConfig, tokenizer):
    """Train / eval / test pair loaders of the task's desideratum, split by context, sources within each split."""
    task = task_of(cfg)
    d = cfg.dcm
    sizes = [int(d.n_train), int(d.n_eval), int(d.n_test)]
    n_total = sum(sizes) + 3 * task.unit(cfg.data)  # whole contexts per split
    examples = task.examples(data_config(cfg, n_total), tokenizer)  # generated, or the first lines of data.path
    splits = task.split(examples, sizes)
    name, legacy = cfg.desideratum.name, bool(cfg.desideratum.get("legacy", False))
    pairs = [task.desideratum_pairs(name, s, cfg.seed + i, legacy) for i, s in enumerate(splits)]
    side = cfg.data.padding_side
    shuffle = not bool(d.get("paper_compat", False))  # the paper's training loader does not shuffle
    return (pair_loader(task, tokenizer, pairs[0], d.batch_size, shuffle=shuffle, seed=cfg.seed, padding_side=side),
            pair_loader(task, tokenizer, pairs[1], d.batch_size, padding_side=side),
            pair_loader(task, tokenizer, pairs[2], d.batch_size, padding_side=side))


def run_dcm(cfg: DictConfig) -> DCMResult:
    """One DCM job: the joint fit with J = 1 (`run_dcm_batch`), or with `dcm.reference=true` (or a sampling
    parametrisation) the one-mask `DCMModule` under Lightning's ModelCheckpoint."""
    if cfg.dcm.get("reference") or cfg.dcm.parametrisation not in DETERMINISTIC:
        return run_dcm_reference(cfg)
    return run_dcm_batch([(cfg, None)])[0]


def batch_key(cfg: DictConfig) -> str | None:
    """DCM jobs that differ only in their group (and circuit file) train on the same pairs: a study fits their masks
    in one pass. None for the reference fit and for sampling parametrisations."""
    if cfg.dcm.get("reference") or cfg.dcm.parametrisation not in DETERMINISTIC:
        return None
    plain = plain_config(cfg)
    for k in ("group", "circuit"):
        plain.pop(k, None)
    return json.dumps(plain, sort_keys=True, default=str)


def run_dcm_batch(jobs: Sequence[tuple[DictConfig, Path | None]]) -> list[DCMResult]:
    """DCM jobs of one `batch_key` as one fit (`MultiDCMModule`); each job's artefacts and result in its folder
    (None: the run's folder)."""
    cfg = jobs[0][0]
    d = cfg.dcm
    L.seed_everything(cfg.seed, verbose=False)
    circuits = [resolve_circuit(c) for c, _ in jobs]
    heads = [[list(h) for h in circuit.groups.get(c.group, [])] for (c, _), (_, circuit) in zip(jobs, circuits)]
    model = load(cfg.model, run_device(cfg))
    paper = bool(d.get("paper_compat", False))
    module = MultiDCMModule(model.cfg, [(c.group, h) for (c, _), h in zip(jobs, heads)], d.parametrisation,
                            float(d.lam), float(d.lr), d.objective, cache_budget(d.get("cache_mb", "auto")), model,
                            validate_at=int(d.val_every) if paper else 0)
    train, val, test = dcm_loaders(cfg, module.tokenizer)
    every = 1 if paper else min(int(d.val_every), len(train))
    label = f"DCM {', '.join(c.group for c, _ in jobs)} -> {cfg.desideratum.name}"
    with run_logger(cfg) as logger:
        trainer = make_trainer(cfg, label, use_distributed_sampler=False, max_epochs=int(d.epochs),
                               val_check_interval=every, logger=logger, enable_checkpointing=False)
        t0 = time.time()
        trainer.fit(module, train, val)
        train_s = time.time() - t0
        last = [next(iter(mask.state_dict().values())).detach().cpu().clone() for mask in module.masks]
        module.use_best()
        trainer.test(module, test, verbose=False)
        floor = module.test_floor.compute()
        results = []
        for k, ((job_cfg, folder), (spec, circuit)) in enumerate(zip(jobs, circuits)):
            with step_output(folder) if folder is not None else nullcontext():
                out = output_dir()
                ckpt = save_tensor(mask_checkpoint(module, k, heads[k]), out / "checkpoints" / "best.ckpt")
                best = module.best[k]
                results.append(dcm_outputs(job_cfg, spec, circuit, heads[k], module.masks[k], module.selected_heads(k),
                                           module.test_accs[k].compute(), floor,
                                           None if best is None else float(best["select"]), last[k], module.scored_at,
                                           train_s, ckpt.stat().st_size if ckpt.exists() else None, logger,
                                           {"jointly_fit_with": len(jobs) - 1,
                                            "validations_run": module.validations_run}))
        return results


def mask_checkpoint(module: MultiDCMModule, k: int, heads: list) -> dict[str, Any]:
    """Mask k of a joint fit as a checkpoint of its own job: `DCMModule.load_from_checkpoint` reads it (the
    mask's state and the one-mask module's hyper-parameters), as it reads a reference fit's best.ckpt."""
    import lightning

    hp = dict(module.hparams)
    return {"state_dict": {f"mask.{n}": t.detach().cpu() for n, t in module.masks[k].state_dict().items()},
            "hyper_parameters": {"model_cfg": hp["model_cfg"], "group": module.groups[k], "heads": heads,
                                 "parametrisation": hp["parametrisation"], "lam": hp["lam"], "lr": hp["lr"],
                                 "objective": hp["objective"], "cache_mb": hp["cache_mb"], "validate_at": hp["validate_at"]},
            "pytorch-lightning_version": lightning.__version__, "best_step": (module.best[k] or {}).get("step")}


def dcm_outputs(cfg: DictConfig, spec, circuit, heads: list, mask, selected: list, acc: dict, floor: dict,
                best_score: float | None, last_values: torch.Tensor, scored_at: list[int], train_s: float,
                ckpt_bytes: int, logger, extra: dict[str, Any] | None = None) -> DCMResult:
    """A DCM job's artefacts (mask.pt, selected_heads.json, mask.png) and typed result, in the run's folder."""
    out = output_dir()
    values = next(iter(mask.state_dict().values())).detach().cpu()
    save_tensor({"values": values, "axes": ("head",), "heads": [HeadId(*h) for h in heads],
                 "parametrisation": cfg.dcm.parametrisation}, out / "mask.pt")
    write_json(out / "selected_heads.json", {"group": cfg.group, "desideratum": cfg.desideratum.name,
                                              "heads": selected, "group_heads": heads}, "etk.dcm_heads/v1")
    mask_plot(values, [f"{h[0]}.{h[1]}" for h in heads], out / "mask.png", f"{cfg.model.name} {cfg.group} / {cfg.desideratum.name}")
    payload = {
        "model": cfg.model.name, "circuit": circuit_label(spec, circuit), "circuit_spec": spec, "group": cfg.group,
        "desideratum": cfg.desideratum.name, "group_size": len(heads), "n_selected": len(selected),
        "selected_heads": selected, "test": acc, "chance_floor_unpatched": floor, "best_val_accuracy": best_score,
        "mask_raw": values.tolist(), "mask_last_step": last_values.tolist(), "validated_after_steps": scored_at,
        "train_seconds": round(train_s, 1), "checkpoint_bytes": ckpt_bytes, **(extra or {}), "config": plain_config(cfg),
    }
    result = emit(DCMResult.from_payload(payload), logger)
    print(f"[etk] DCM {cfg.model.name} {cfg.group}/{cfg.desideratum.name}: {len(selected)}/{len(heads)} heads, "
          f"test accuracy {acc['accuracy']:.3f} (95% CI {acc['ci_low']:.3f}-{acc['ci_high']:.3f}; "
          f"unpatched floor {floor['accuracy']:.3f}), {train_s:.0f} s")
    return result


def run_dcm_reference(cfg: DictConfig) -> DCMResult:
    """One mask, one `DCMModule` fit under Lightning's ModelCheckpoint (the pre-0.9 procedure)."""
    L.seed_everything(cfg.seed, verbose=False)
    out = output_dir()
    spec, circuit = resolve_circuit(cfg)
    heads = [list(h) for h in circuit.groups.get(cfg.group, [])]
    d = cfg.dcm
    model = load(cfg.model, run_device(cfg))
    paper = bool(d.get("paper_compat", False))  # the paper's schedule: validate after steps 1, 1 + k, ...; no shuffle
    module = DCMModule(model.cfg, cfg.group, heads, d.parametrisation, float(d.lam), float(d.lr), d.objective,
                       cache_budget(d.get("cache_mb", "auto")), model, validate_at=int(d.val_every) if paper else 0)
    train, val, test = dcm_loaders(cfg, module.tokenizer)
    every = 1 if paper else min(int(d.val_every), len(train))
    with run_logger(cfg) as logger:
        ckpt = ModelCheckpoint(dirpath=out / "checkpoints", monitor="val/select", mode="max", save_top_k=1,
                               filename="best", save_weights_only=True)
        trainer = make_trainer(cfg, f"DCM {cfg.group} -> {cfg.desideratum.name}", use_distributed_sampler=False,
                               max_epochs=int(d.epochs), val_check_interval=every, logger=logger, callbacks=[ckpt])
        t0 = time.time()
        trainer.fit(module, train, val)
        train_s = time.time() - t0
        raw_last = next(iter(module.mask.state_dict().values())).detach().cpu().clone()
        best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(best, strict=False)
        trainer.test(module, test, verbose=False)
        return dcm_outputs(cfg, spec, circuit, heads, module.mask, module.selected_heads(), module.test_acc.compute(),
                           module.test_floor.compute(),
                           float(ckpt.best_model_score) if ckpt.best_model_score is not None else None, raw_last,
                           module.scored_at, train_s, (out / "checkpoints" / "best.ckpt").stat().st_size
                           if (out / "checkpoints" / "best.ckpt").exists() else None, logger)
