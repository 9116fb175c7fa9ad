"""Other Llama-family architectures through the same adapter: Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Mistral, as tiny random
models built offline. For each: the identity patch is an exact no-op, a head patch equals a hand-written hook,
the hooked z equals attention computed by hand, fast path patching equals naive on all four stages, and a run
through the CLI works. Anything else is refused with an error naming the architecture."""

import math

import pytest
import torch

from etk.errors import ConfigError
from etk.interventions.components import all_heads
from etk.interventions.hooks import Capture, Patch, hooked
from etk.methods.path_patching.fast import fast_scores
from etk.methods.path_patching.naive import naive_scores
from etk.methods.path_patching.stages import reachable_layers, receivers_from, task_stages
from etk.models.arch import LlamaFamily
from etk.models.forward import last_logits
from etk.models.tiny import tiny_llama
from etk.tasks import task_named
from tests.helpers import RECV, batch_of, compose_run, pp_batch

ARCHS = ["qwen2", "qwen3", "mistral", "llama"]


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tok):
    return tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=11, arch=request.param)


@pytest.fixture(scope="module")
def batches(tok):
    return batch_of(tok, n=6, n_boxes=3, seed=0)[0], batch_of(tok, n=6, n_boxes=3, seed=1)[0]


def test_builds_the_named_architecture(model):
    arch = LlamaFamily(model)
    kind = model.config.model_type
    assert kind in ARCHS
    has_bias = arch.proj(0, "q_proj").bias is not None
    assert has_bias == (kind == "qwen2") and hasattr(arch.attn(0), "q_norm") == (kind == "qwen3")
    if has_bias:
        assert arch.proj(0, "v_proj").bias.abs().sum() > 0  # the biases take part


def test_identity_patches_are_exact_no_ops(model, batches):
    base, _ = batches
    clean = last_logits(model, base)
    pos = torch.stack([base.roles["last"], base.roles["query_label"]], 1)  # [B, 2]
    for site in ("z", "q", "v"):
        with hooked(model, captures=[Capture(site, 2, pos)]) as cache:
            last_logits(model, base)
        vals = cache[(site, 2)]
        keep = torch.zeros(vals.shape[:3], dtype=torch.bool)
        with hooked(model, patches=[Patch(site, 2, vals, keep, pos)]):
            assert torch.equal(last_logits(model, base), clean), site


def test_head_patch_equals_a_handwritten_hook(model, batches):
    base, src = batches
    arch = LlamaFamily(model)
    layer, head, D = 1, 3, arch.dims.head_dim
    pos_b, pos_s = base.roles["last"], src.roles["last"]
    with hooked(model, captures=[Capture("z", layer, pos_s[:, None])]) as cache:
        last_logits(model, src)
    zs = cache[("z", layer)]  # [B, 1, H, D]
    keep = torch.ones(zs.shape[:3], dtype=torch.bool)
    keep[:, :, head] = False
    with hooked(model, patches=[Patch("z", layer, zs, keep, pos_b[:, None])]):
        ours = last_logits(model, base)
    assert not torch.allclose(ours, last_logits(model, base))

    def pre(mod, args):
        x = args[0].clone()
        x[torch.arange(x.shape[0]), pos_b, head * D:(head + 1) * D] = zs[:, 0, head]
        return (x,)

    h = arch.proj(layer, "o_proj").register_forward_pre_hook(pre)
    try:
        ref = model(**base.model_inputs()).logits[torch.arange(len(base)), pos_b]
    finally:
        h.remove()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def test_hooked_z_equals_attention_computed_by_hand(model, batches):
    """z of every head at every real position, from the layer's input residual: norm, q/k/v projections (with
    their biases), RoPE, grouped keys/values, causal softmax over real tokens."""
    base, _ = batches
    arch = LlamaFamily(model)
    dims, layer = arch.dims, 2
    H, KV, D = dims.n_heads, dims.n_kv_heads, dims.head_dim
    seen = {}

    def grab(mod, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = arch.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with hooked(model, captures=[Capture("z", layer)]) as cache:
            last_logits(model, base)
    finally:
        handle.remove()
    z_hooked = cache[("z", layer)]  # [B, T, H, D]
    h = seen["h"]  # [B, T, d]
    B, T, _ = h.shape
    x = arch.input_norm(layer)(h)
    q = arch.proj(layer, "q_proj")(x).view(B, T, H, D)
    k = arch.proj(layer, "k_proj")(x).view(B, T, KV, D)
    attn = arch.attn(layer)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm of each head's q and k before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = arch.proj(layer, "v_proj")(x).view(B, T, KV, D).transpose(1, 2)
    cos, sin = model.model.rotary_emb(h, base.position_ids)  # [B, T, D]
    cos, sin = cos[:, None], sin[:, None]
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)  # [B, H, T, D]
    s = q @ k.transpose(-1, -2) / math.sqrt(D)  # [B, H, T, T]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & base.attention_mask.bool()[:, None, :]  # [B, T, T]
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    z = (s.softmax(-1) @ v).transpose(1, 2)  # [B, T, H, D]
    real = base.attention_mask.bool()
    torch.testing.assert_close(z_hooked[real], z[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("group", ["value_fetcher", "pos_transmitter", "pos_detector", "struct_reader"])
def test_fast_path_patching_equals_naive(tok, model, group):
    batch = pp_batch(tok, n=6, n_boxes=3)
    dims = LlamaFamily(model).dims
    st = task_stages(task_named("entity_tracking"))[group]
    rec = None if st.receiver_site is None else receivers_from(RECV[:2], st.receiver_site, dims)
    reach = [h for h in all_heads(dims) if h.layer in reachable_layers(st, rec, dims.n_layers)]
    naive = naive_scores(model, batch, st, rec, reach)[0]
    fast = fast_scores(model, batch, st, rec, reach)[0]
    assert naive.abs().max() > 0
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_a_run_through_the_cli(tmp_path, arch):
    import json

    compose_run(tmp_path, ["model=tiny", f"+model.tiny.arch={arch}", "method=path_patching", "logger=none",
                           "data.n_examples=12", "data.n_boxes=3", "method.n_examples=6", "method.batch_size=3",
                           "trainer.enable_progress_bar=false"])
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["schema"] == "etk.path_patching/v1"
    assert doc["config"]["model"]["tiny"]["arch"] == arch
    assert doc["stages"]["value_fetcher"]["n_senders_scored"] == 8


def test_other_architectures_are_refused_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16))
    with pytest.raises(ConfigError, match="'gpt2'"):
        LlamaFamily(m)
