"""Test set-up: offline hubs, W&B disabled, tiny models built once per session."""

import os
import tempfile

os.environ["WANDB_MODE"] = "disabled"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="etk-wandb-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from etk.models.tiny import tiny_llama, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny(tok):
    """2-layer GQA Llama: 4 query heads, 2 KV groups."""
    return tiny_llama(len(tok), n_layers=2, n_heads=4, n_kv_heads=2, seed=0)


@pytest.fixture(scope="session")
def tiny_mha(tok):
    """3-layer Llama without GQA."""
    return tiny_llama(len(tok), n_layers=3, n_heads=4, n_kv_heads=4, seed=1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tok, tiny):
    """The tiny model and tokenizer saved to disk, for the real from_pretrained path."""
    d = tmp_path_factory.mktemp("tiny-model")
    tiny.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
