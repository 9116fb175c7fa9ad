"""`finetune.py`: train a LoRA (or full) fine-tune, evaluate it on the standard set, export adapter + card."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from etk.artifacts import write_json
from etk.data.datasets import EncodedDataset, pad_id
from etk.data.finetune_data import TextItem, arithmetic_items, boxes_items, relation_items
from etk.errors import ConfigError
from etk.methods.eval.module import AccuracyModule
from etk.methods.eval.run import evaluate_sets
from etk.methods.finetune.module import FineTuneModule, collate_lm, encode_items
from etk.models.loading import LoadedModel, load_model, resolve_path
from etk.results import FinetuneResult
from etk.runtime import emit, make_trainer, output_dir, plain_config, run_logger
from etk.tasks import task_of


def training_items(cfg: DictConfig, tokenizer, n: int) -> list[TextItem]:
    d = cfg.finetune_data
    if d.kind == "boxes":
        return boxes_items(n, tokenizer, cfg.seed, d.min_boxes, d.max_boxes, d.objects, tuple(d.templates))
    if d.kind == "arithmetic":
        return arithmetic_items(n, cfg.seed, d.max_digits, tuple(d.ops))
    if d.kind == "relations":
        return relation_items(n, tokenizer, cfg.seed, tuple(d.frames), d.min_entities, d.max_entities, d.objects,
                              d.names, float(d.get("arithmetic_fraction", 0.0)))
    raise ConfigError(f"unknown finetune_data.kind {d.kind!r} (boxes | arithmetic | relations)")


def evaluate_model(module: FineTuneModule, cfg: DictConfig, logger) -> list[dict[str, Any]]:
    """Accuracy of the merged fine-tuned model on the task's evaluation sets (entity tracking: per box count of
    `eval.box_counts`)."""
    acc = AccuracyModule(module.hparams.model_cfg, LoadedModel(module.merged(), module.tokenizer, module.hparams.model_cfg))
    trainer = make_trainer(cfg, "eval of the fine-tuned model: prompt batches")
    return evaluate_sets(task_of(cfg), acc, cfg.data, cfg.eval, trainer,
                         f"fine-tuned {cfg.model.name}+{cfg.finetune_data.kind}", logger)


def export_adapter(adapter_dir: Path, target: Path, card: dict[str, Any]) -> None:
    """Copy the adapter (safetensors + config) and its card into `target`, replacing what was there."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(adapter_dir / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = card["base_model"]  # a zoo name, not this machine's cache path
    (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
    write_json(tmp / "card.json", card, "etk.adapter_card/v1")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def run_finetune(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, verbose=False)
    out = output_dir()
    steps, bs = int(cfg.train.steps), int(cfg.train.batch_size)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    module = FineTuneModule(model_cfg, OmegaConf.to_container(cfg.lora), OmegaConf.to_container(cfg.optim), steps,
                            LoadedModel(*load_model(cfg.model), model_cfg))  # a fresh copy: its weights are trained
    items = encode_items(module.tokenizer, training_items(cfg, module.tokenizer, steps * bs))
    loader = DataLoader(EncodedDataset(items), batch_size=bs, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed),
                        collate_fn=partial(collate_lm, pad_id=pad_id(module.tokenizer)))
    with run_logger(cfg) as logger:
        ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_train_steps=cfg.train.checkpoint_every)
        trainer = make_trainer(cfg, "fine-tuning", max_steps=steps, logger=logger, callbacks=[ckpt])
        t0 = time.time()
        trainer.fit(module, loader)
        train_s = time.time() - t0
        losses = [float(v) for k, v in trainer.callback_metrics.items() if k == "train/loss"]
        adapter_dir = out / "adapter"
        if cfg.lora.enabled:
            module.net.save_pretrained(adapter_dir)
        rows = evaluate_model(module, cfg, logger)
        card = {
            "base_model": cfg.model.name,
            "base_adapters": list(cfg.model.get("adapters") or []),
            "finetune_data": OmegaConf.to_container(cfg.finetune_data),
            "lora": OmegaConf.to_container(cfg.lora),
            "optim": OmegaConf.to_container(cfg.optim),
            "steps": steps, "batch_size": bs, "seed": int(cfg.seed),
            "train_seconds": round(train_s, 1), "final_train_loss": losses[-1] if losses else None,
            "eval": rows,
            "command": "python finetune.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        }
        result = emit(FinetuneResult.from_payload({**card, "config": plain_config(cfg)}), logger)
        if cfg.export and cfg.lora.enabled:
            export_adapter(adapter_dir, resolve_path(str(cfg.export)), card)
            print(f"[etk] adapter exported to {cfg.export}")
        print(f"[etk] trained {steps} steps in {train_s:.0f} s")
        return result
