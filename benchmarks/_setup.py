"""What every benchmark script starts with: the repo on sys.path, hub access off, gradients off, and a model config
composed and loaded like the CLI does."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONF = ROOT / "conf"


def load(model: str, *overrides: str, device=None):
    """(cfg, model, tokenizer) for `model=<model>` plus overrides, with gradients off."""
    import torch
    from hydra import compose, initialize_config_dir

    from etk.models.loading import load_model

    torch.set_grad_enabled(False)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("patching", overrides=[f"model={model}", *overrides])
    net, tok = load_model(cfg.model, device) if device is not None else load_model(cfg.model)
    return cfg, net, tok
