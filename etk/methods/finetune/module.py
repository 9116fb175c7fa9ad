"""Fine-tuning as a LightningModule: LoRA (peft) or full fine-tuning of any zoo model, loss on answer tokens only.

Checkpoints hold only the trainable weights (the adapter, or the full weights when fine-tuning fully)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from etk.data.finetune_data import TextItem
from etk.models.loading import LoadedModel, load_model

IGNORE = -100


def encode_items(tokenizer, items: list[TextItem]) -> list[dict[str, list[int]]]:
    """ids = tokens(prompt) + tokens(answer); labels mask the prompt (and BOS) with -100."""
    out = []
    for it in items:
        p = tokenizer(it.prompt)["input_ids"]
        a = tokenizer(it.answer, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": p + a, "labels": [IGNORE] * len(p) + a})
    return out


def collate_lm(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    T = max(len(it["input_ids"]) for it in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        ids[b, :n] = torch.tensor(it["input_ids"])
        labels[b, :n] = torch.tensor(it["labels"])
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class FineTuneModule(L.LightningModule):
    def __init__(self, model_cfg: dict[str, Any], lora: dict[str, Any], optim: dict[str, Any], max_steps: int,
                 model: LoadedModel | None = None):
        """`model`: a fresh (not shared) copy of the weights to train; loaded from `model_cfg` when not given."""
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        net, self.tokenizer = (model.net, model.tokenizer) if model is not None else load_model(OmegaConf.create(model_cfg))
        if lora.get("enabled", True):
            from peft import LoraConfig, get_peft_model

            net = get_peft_model(net, LoraConfig(
                r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0),
                target_modules=list(lora["target_modules"]), bias="none", task_type="CAUSAL_LM",
            ))
        else:
            net.requires_grad_(True)
        self.net = net

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        o = self.hparams.optim
        opt = torch.optim.AdamW(self.trainable(), lr=o["lr"], weight_decay=o.get("weight_decay", 0.0))
        warm, total = int(o.get("warmup_steps", 0)), max(1, int(self.hparams.max_steps))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (total - step) / max(1, total - warm))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}

    def merged(self):
        """The fine-tuned model as a plain HF model (adapter merged), eval mode, gradients off."""
        net = self.net.merge_and_unload() if hasattr(self.net, "merge_and_unload") else self.net
        self.net = net
        return net.eval().requires_grad_(False)
