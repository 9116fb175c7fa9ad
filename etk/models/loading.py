"""Load a model and tokenizer from a `model` config: tiny random, local weights, or the packaged GGUF, plus
LoRA adapters merged at load. Nothing is ever downloaded: hubs are switched off and local paths are checked
before transformers is called."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from etk.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from etk.errors import EtkError  # noqa: E402
from etk.models.arch import LlamaFamily  # noqa: E402
from etk.models.embedded import ModelNotFoundError, dequantised_dir  # noqa: E402
from etk.models.tiny import planted_llama, tiny_llama, tiny_tokenizer  # noqa: E402

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def resolve_dtype(name: str | None) -> torch.dtype:
    """The weights' dtype. `auto` is fp32 on every device: half precision changes the study's numbers (bf16
    path-patching rankings agree with fp32 at Spearman 0.39 on the embedded model), so it is never chosen silently:
    ask for it by name (`model.dtype=bf16`). Faster fp32 on a GPU is `model.matmul_precision` (TF32)."""
    if name in (None, "auto"):
        return torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_path(spec: str) -> Path:
    """`etk:<relative path>` names a file shipped inside the etk package; anything else is a filesystem path."""
    if spec.startswith("etk:"):
        return Path(str(resources.files("etk").joinpath(spec[4:])))
    return Path(os.path.expanduser(spec))


def local_model_dir(cfg: Any) -> Path:
    """`model.path`, or `$ETK_MODEL_ROOT/<model.root_subdir>`; a clear error when neither holds weights."""
    if cfg.get("path"):
        path = resolve_path(str(cfg.path))
    elif os.environ.get("ETK_MODEL_ROOT") and cfg.get("root_subdir"):
        path = Path(os.environ["ETK_MODEL_ROOT"]) / cfg.root_subdir
    else:
        raise ModelNotFoundError(
            f"model {cfg.name!r} needs local weights: pass model.path=/dir/with/config.json or set ETK_MODEL_ROOT "
            f"so that $ETK_MODEL_ROOT/{cfg.get('root_subdir')} holds them (model hubs are not used)"
        )
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"model {cfg.name!r}: no config.json in {path} (weights missing or wrong path)")
    return path


def missing_weights(cfg: Any) -> str | None:
    """Why a model config's weights are not on this machine (local weights or adapters absent), or None."""
    if cfg.get("source") != "local":
        return None
    try:
        local_model_dir(cfg)
    except ModelNotFoundError as e:
        return str(e)
    for spec in cfg.get("adapters") or []:
        if not resolve_path(str(spec)).exists():
            return f"its adapter {spec} is not there"
    return None


def dispatch_kwargs(cfg: Any) -> dict:
    """`model.device_map` (accelerate: "auto", "balanced", or {module: device | "cpu" | "disk"}), `model.max_memory`
    ({device: "20GiB", ...}) and `model.offload_folder` (for "disk"), as from_pretrained arguments."""
    dm = cfg.get("device_map")
    if not dm:
        return {}
    from omegaconf import OmegaConf

    plain = lambda v: OmegaConf.to_container(v, resolve=True) if hasattr(v, "keys") else v  # noqa: E731
    kw: dict[str, Any] = {"device_map": plain(dm)}
    if cfg.get("max_memory"):
        kw["max_memory"] = plain(cfg.max_memory)
    if cfg.get("offload_folder"):
        kw["offload_folder"] = str(resolve_path(str(cfg.offload_folder)))
    return kw


def is_dispatched(model) -> bool:
    """True for a model that accelerate split over devices (its modules move tensors themselves)."""
    return bool(getattr(model, "hf_device_map", None))


def _from_pretrained(path: Path, dtype: torch.dtype, attn: str | None, dispatch: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"attn_implementation": attn} if attn else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True, **kw, **(dispatch or {}))
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


class AdapterError(EtkError, ValueError):
    """A LoRA adapter folder that cannot be read."""


def _peft(model, spec: str):
    """`PeftModel.from_pretrained` on a local adapter folder, with errors that name the folder."""
    from peft import PeftModel

    path = resolve_path(str(spec))
    if not (path / "adapter_config.json").exists():
        raise ModelNotFoundError(f"adapter {spec!r}: no adapter_config.json in {path}")
    try:
        return PeftModel.from_pretrained(model, str(path), local_files_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not the library's internals
        raise AdapterError(f"adapter {spec!r} in {path} cannot be loaded ({type(e).__name__}: {str(e)[:200]}); the "
                           "files may be truncated or made for another base model: restore or re-export them "
                           "(finetune.py ... export=<dir>)") from None


def merge_adapters(model, adapters: list) -> Any:
    """Merge LoRA adapters into the weights, in order (a stack: e.g. tracker, then arithmetic)."""
    for spec in adapters:
        model = _peft(model, spec).merge_and_unload()
    return model


def attach_adapter(model, spec: str):
    """Wrap `model` in a PeftModel with the LoRA adapter `spec`, NOT merged: `with model.disable_adapter():` runs
    the original weights, so one copy of them serves both members of a pair."""
    return _peft(model, spec).eval().requires_grad_(False)


def _from_cache(cfg: Any, dtype, attn):
    """The embedded model from its dequantised cache; a cache that fails to read (truncated, corrupt: e.g. a copy
    interrupted by another tool) is removed and rebuilt once from the packaged GGUF, and a second failure names the
    folder to delete."""
    import shutil

    folder = dequantised_dir(cfg.package, cfg.gguf_file)
    try:
        return _from_pretrained(folder, dtype, attn, dispatch_kwargs(cfg))
    except Exception as first:  # safetensors' SafetensorError, OSError, EOFError...: the cache is unreadable
        print(f"[etk] the cached dequantised model {folder} cannot be read ({type(first).__name__}: {first}); "
              "rebuilding it from the packaged GGUF")
        shutil.rmtree(folder, ignore_errors=True)
    folder = dequantised_dir(cfg.package, cfg.gguf_file)
    try:
        return _from_pretrained(folder, dtype, attn, dispatch_kwargs(cfg))
    except Exception as second:
        raise CacheError(f"the dequantised model cache {folder} cannot be read even after a rebuild "
                         f"({type(second).__name__}: {second}); delete that folder (or set ETK_CACHE_DIR to another "
                         "place with free space) and run again") from None


class CacheError(EtkError, OSError):
    """The dequantised-model cache cannot be read or rebuilt."""


def load_model(cfg: Any, device: str | torch.device | None = None):
    """(model, tokenizer) for a `model` config, in eval mode with gradients off, on `device` (default: CPU).

    `dtype: auto` is fp32 (`resolve_dtype`)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = resolve_dtype(cfg.get("dtype", "auto"))
    source = cfg.get("source", "local")
    attn = cfg.get("attn_implementation")
    if source == "tiny":
        t = dict(cfg.get("tiny", {}))
        tokenizer = tiny_tokenizer()
        planted = t.pop("planted", None)
        if planted:
            model = planted_llama(tokenizer, planted, int(t.get("planted_head", 2)), dtype=dtype)
        else:
            t.pop("planted_head", None)
            model = tiny_llama(len(tokenizer), **t, dtype=dtype)
    elif source == "gguf_package":
        model, tokenizer = _from_cache(cfg, dtype, attn)
    elif source == "local":
        model, tokenizer = _from_pretrained(local_model_dir(cfg), dtype, attn, dispatch_kwargs(cfg))
    else:
        raise ConfigError(f"unknown model.source {source!r} (tiny | local | gguf_package)")
    model = merge_adapters(model, list(cfg.get("adapters") or []))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    LlamaFamily.of(model)  # validates the architecture early
    if not is_dispatched(model):  # a dispatched model stays where accelerate placed it
        model = model.to(device)
    return model.eval().requires_grad_(False), tokenizer


_REUSE: dict[str, Any] = {"slots": 0, "models": OrderedDict()}


@contextmanager
def reuse_models(slots: int):
    """Inside the block, `shared_model` keeps the last `slots` loaded frozen models and hands the same object to a
    later job whose model config is identical (a study's jobs alternate between a pair's two members), instead of
    loading the weights again. 0 = off. The models are dropped when the block ends."""
    saved = dict(_REUSE)
    _REUSE.update(slots=max(0, int(slots)), models=OrderedDict())
    try:
        yield
    finally:
        _REUSE.update(saved)


def model_bytes(cfg: Any) -> int | None:
    """The weights' size in memory (parameters x bytes of the run's dtype) from the model's config.json, or None
    when it cannot be read without loading (tiny and packaged models are small)."""
    try:
        path = local_model_dir(cfg) if cfg.get("source", "local") == "local" else None
    except ModelNotFoundError:
        return None
    if path is None:
        return None
    c = json.loads((path / "config.json").read_text())
    d, layers, vocab = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["vocab_size"])
    inter, heads = int(c["intermediate_size"]), int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    per_layer = 2 * d * d + 2 * d * (d // heads) * kv + 3 * d * inter
    n = layers * per_layer + vocab * d * (1 if c.get("tie_word_embeddings") else 2)
    return n * torch.empty((), dtype=resolve_dtype(cfg.get("dtype", "auto"))).element_size()


def free_memory_bytes(device: str | torch.device) -> int:
    """Free memory where models and caches live: the CUDA device's free memory, or the host's available RAM."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # no /proc (macOS): assume a laptop's 8 GB


def model_slots(setting: Any, member_cfgs: list[Any], device: str | torch.device | None = None) -> int:
    """How many loaded models a study keeps between jobs (`reuse_models`): an int as given, or `auto`: both
    members when their weights plus room for the work (a quarter of the larger one: two fp32 7B members and their
    work fit an 80 GB GPU) fit in 80% of the free memory of the run's device, else one."""
    if setting not in (None, "auto"):
        return max(0, int(setting))
    device = device if device is not None else default_device()
    sizes = [model_bytes(c) for c in member_cfgs]
    if any(s is None for s in sizes):
        return len(member_cfgs)  # small models (tiny, packaged): keep them all
    need = sum(sizes) + max(sizes) / 4  # type: ignore[arg-type, operator]
    return len(member_cfgs) if need <= 0.8 * free_memory_bytes(device) else 1


def _key(cfg: Any) -> str:
    """A model config as a cache key (its resolved, sorted JSON)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if hasattr(cfg, "keys") and not isinstance(cfg, dict) else cfg
    return json.dumps(plain, sort_keys=True, default=str)


@contextmanager
def preloaded(*models: "LoadedModel"):
    """Inside the block, a job whose model config equals one of `models`' configs runs on that model object, in
    memory (the Python API: the same runner code as the CLI, on a model the user already holds)."""
    saved = _REUSE.get("preloaded", {})
    _REUSE["preloaded"] = {**saved, **{_key(m.cfg): (m.net, m.tokenizer) for m in models}}
    try:
        yield
    finally:
        _REUSE["preloaded"] = saved


def preloaded_model(cfg: Any):
    """(model, tokenizer) preloaded for this config (`preloaded`), or None."""
    return _REUSE.get("preloaded", {}).get(_key(cfg))


def shared_model(cfg: Any, device: str | torch.device | None = None):
    """(model, tokenizer) for a frozen-model job: `load_model(cfg, device)`, or inside `reuse_models` the model an
    earlier job loaded from the same config (eval mode, no gradients; etk's interventions live in hooks that are
    always removed, so the weights are never changed)."""
    held = preloaded_model(cfg)
    if held is not None:
        return held
    if not _REUSE["slots"]:
        return load_model(cfg, device)
    key = _key(cfg)
    models: OrderedDict = _REUSE["models"]
    if key in models:
        models.move_to_end(key)
        net, tok = models[key]
        return net.eval().requires_grad_(False), tok
    while len(models) >= _REUSE["slots"]:
        models.popitem(last=False)
    models[key] = load_model(cfg, device)
    return models[key]


@dataclass
class LoadedModel:
    """A frozen model in memory with its tokenizer and the (plain, resolved) `model` config it was built from: what
    every LightningModule of etk receives at construction, and what `etk.load_model` returns."""

    net: Any
    tokenizer: Any
    cfg: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.cfg.get("name"))

    @property
    def arch(self) -> LlamaFamily:
        return LlamaFamily.of(self.net)


def load(cfg: Any, device: str | torch.device | None = None) -> LoadedModel:
    """The one way a run gets its model: `shared_model(cfg, device)` (a preloaded or reused model, else loaded from
    disk straight to `device`, the run's device: `etk.runtime.run_device`) with its plain config."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    net, tok = shared_model(cfg, device)
    return LoadedModel(net, tok, OmegaConf.to_container(cfg, resolve=True))
