"""`train_dcm.py`: train a DCM mask over one circuit group, select by the paper's rule, test, write artefacts."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from etk.artifacts import save_tensor, write_json
from etk.circuits import circuit_label, resolve_circuit
from etk.data.datasets import pair_loader
from etk.methods.dcm.module import DCMModule
from etk.models.loading import load
from etk.report.plots import mask_plot
from etk.results import DCMResult
from etk.runtime import data_config, emit, output_dir, plain_config, run_logger, trainer_kwargs
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


def run_dcm(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, verbose=False)
    out = output_dir()
    spec, circuit = resolve_circuit(cfg)
    heads = [list(h) for h in circuit.groups.get(cfg.group, [])]
    d = cfg.dcm
    model = load(cfg.model)
    paper = bool(d.get("paper_compat", False))  # the paper's schedule: validate after steps 1, 1 + k, ...; no shuffle
    module = DCMModule(model.cfg, cfg.group, heads, d.parametrisation, float(d.lam), float(d.lr), d.objective,
                       float(d.get("cache_mb", 512)), model, validate_at=int(d.val_every) if paper else 0)
    train, val, test = dcm_loaders(cfg, module.tokenizer)
    every = 1 if paper else min(int(d.val_every), len(train))
    with run_logger(cfg) as logger:
        ckpt = ModelCheckpoint(dirpath=out / "checkpoints", monitor="val/select", mode="max", save_top_k=1,
                               filename="best", save_weights_only=True)
        trainer = L.Trainer(**trainer_kwargs(cfg), use_distributed_sampler=False, max_epochs=int(d.epochs), val_check_interval=every,
                            logger=logger or False, callbacks=[ckpt])
        t0 = time.time()
        trainer.fit(module, train, val)
        train_s = time.time() - t0
        raw_last = module.mask.state_dict()
        best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(best, strict=False)
        trainer.test(module, test, verbose=False)
        acc, floor = module.test_acc.compute(), module.test_floor.compute()
        values = next(iter(module.mask.state_dict().values())).detach().cpu()
        selected = module.selected_heads()
        save_tensor({"values": values, "axes": ("head",), "heads": module.headset.heads(module.role),
                    "parametrisation": d.parametrisation}, out / "mask.pt")
        write_json(out / "selected_heads.json", {"group": cfg.group, "desideratum": cfg.desideratum.name,
                                                  "heads": selected, "group_heads": heads}, "etk.dcm_heads/v1")
        mask_plot(values, [f"{h[0]}.{h[1]}" for h in heads], out / "mask.png",
                  f"{cfg.model.name} {cfg.group} / {cfg.desideratum.name}")
        payload = {
            "model": cfg.model.name, "circuit": circuit_label(spec, circuit), "circuit_spec": spec, "group": cfg.group,
            "desideratum": cfg.desideratum.name, "group_size": len(heads), "n_selected": len(selected),
            "selected_heads": selected, "test": acc, "chance_floor_unpatched": floor,
            "best_val_accuracy": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
            "mask_raw": values.tolist(), "mask_last_step": next(iter(raw_last.values())).tolist(),
            "validated_after_steps": module.scored_at, "train_seconds": round(train_s, 1), "checkpoint_bytes": (out / "checkpoints" / "best.ckpt").stat().st_size,
            "config": plain_config(cfg),
        }
        result = emit(DCMResult.from_payload(payload), logger)
        print(f"[etk] DCM {cfg.model.name} {cfg.group}/{cfg.desideratum.name}: {len(selected)}/{len(heads)} heads, "
              f"test accuracy {acc['accuracy']:.3f} (95% CI {acc['ci_low']:.3f}-{acc['ci_high']:.3f}; "
              f"unpatched floor {floor['accuracy']:.3f}), {train_s:.0f} s")
        return result
