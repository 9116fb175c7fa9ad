"""The split forward (unpatched prefix + patched suffix) of DCM and activation patching, its row cache, and the
shared-prefix attention of path patching's receiver step: each against a plain HF forward with a hand-written hook."""

import pytest
import torch

from etk.interventions.heads import HeadSet, capture
from etk.interventions.prefix import (
    RowCache,
    earliest,
    patched_last_logits,
    prefix_rows,
    split_position,
    stack,
    unpatched_rows,
    unstack,
)
from etk.models.arch import LlamaFamily
from etk.models.forward import last_logits
from etk.models.partial import LayerInputs, SharedPrefix
from etk.models.tiny import tiny_llama
from tests.helpers import batch_of, mixed_length_examples


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("role", ["last", "query_label", "prev_query_label"])
def test_split_forward_equals_the_full_forward_with_a_hand_written_hook(tok, tiny, side, role):
    batch, _ = batch_of(tok, n=6, examples=mixed_length_examples(tok, 6), padding_side=side)
    source, _ = batch_of(tok, n=6, seed=3, examples=mixed_length_examples(tok, 6, seed=3), padding_side=side)
    hs = HeadSet.at(role, [(1, 2), (1, 0), (0, 3)])
    src = capture(tiny, source, hs)
    n_heads = LlamaFamily.of(tiny).dims.n_heads
    m = torch.tensor([0.25, 0.0, 0.5])
    got = patched_last_logits(tiny, batch, hs.patches(src, batch, n_heads, m), batch.roles[role], min_prefix=0)
    short = patched_last_logits(tiny, batch, hs.patches(src, batch, n_heads, m), batch.roles[role], min_prefix=1)
    pos = batch.roles[role]

    def hook(layer):
        idx = [i for i, (la, _) in enumerate(hs.heads(role)) if la == layer]
        return [hs.heads(role)[i].head for i in idx], m[idx]

    dims = LlamaFamily.of(tiny).dims
    handles = []
    for layer in (0, 1):
        heads, w = hook(layer)

        def pre(mod, args, heads=heads, w=w, layer=layer):
            z = args[0].unflatten(-1, (dims.n_heads, dims.head_dim)).clone()
            b = torch.arange(z.shape[0])
            for i, h in enumerate(heads):
                z[b, pos, h] = w[i] * z[b, pos, h] + (1 - w[i]) * src[(role, layer)][:, 0, h]
            return (z.flatten(-2),)
        handles.append(LlamaFamily.of(tiny).proj(layer, "o_proj").register_forward_pre_hook(pre))
    try:
        want = last_logits(tiny, batch)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(short, want, rtol=1e-5, atol=1e-5)  # a prefix too short to split: one plain forward
    assert not torch.allclose(want, last_logits(tiny, batch), atol=1e-3)  # the patch takes effect
    # identity: no patch gives the plain forward
    assert torch.allclose(patched_last_logits(tiny, batch, [], batch.roles[role]), last_logits(tiny, batch),
                          rtol=1e-5, atol=1e-5)


def test_split_forward_gradient_equals_the_full_forward_gradient(tok, tiny):
    """DCM trains through the split forward: d(answer logit)/d(mask) equals the full forward's."""
    batch, _ = batch_of(tok, n=5)
    source, _ = batch_of(tok, n=5, seed=4)
    hs = HeadSet.at("query_label", [(0, 1), (1, 3)])
    src = capture(tiny, source, hs)
    grads = []
    for split in (True, False):
        m = torch.full((2,), 0.5, requires_grad=True)
        patches = hs.patches(src, batch, 4, m)
        if split:
            logits = patched_last_logits(tiny, batch, patches, batch.roles["query_label"])
        else:
            from etk.interventions.hooks import hooked
            with hooked(tiny, patches=patches):
                logits = last_logits(tiny, batch)
        logits.gather(1, batch.answer[:, None]).sum().backward()
        grads.append(m.grad.clone())
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_cached_prefix_is_bit_identical_across_batch_compositions(tok, tiny):
    """Rows computed in one batch serve another batch holding them in another order and company: the same logits,
    bit for bit, as computing the prefix for that batch."""
    full, _ = batch_of(tok, n=8)
    full.index = torch.arange(8)
    hs = HeadSet.at("query_label", [(1, 1)])
    src = capture(tiny, full, hs)
    cache = RowCache(64)
    patched_last_logits(tiny, full, hs.patches(src, full, 4), full.roles["query_label"], cache, "s")  # fills rows 0..7
    assert cache.misses == 1 and len(cache.rows["s"]) == 8
    order = torch.tensor([5, 2, 7, 0])
    sub, _ = batch_of(tok, n=8)
    sub = type(sub)(sub.input_ids[order], sub.attention_mask[order], sub.position_ids[order],
                    {k: v[order] for k, v in sub.roles.items()}, sub.answer[order], sub.token_roles[order], order)
    sub_src = {k: v[order] for k, v in src.items()}
    a = patched_last_logits(tiny, sub, hs.patches(sub_src, sub, 4), sub.roles["query_label"], cache, "s")
    b = patched_last_logits(tiny, sub, hs.patches(sub_src, sub, 4), sub.roles["query_label"])
    assert cache.hits == 1 and torch.equal(a, b)


def test_row_cache_checks_rows_and_respects_its_budget(tok, tiny):
    batch, _ = batch_of(tok, n=4)
    batch.index = torch.arange(4)
    rows = prefix_rows(tiny, batch, batch.roles["query_label"])
    per_row = sum(t.numel() * t.element_size() for t in rows[0].values())
    cache = RowCache(per_row * 2.5 / 2 ** 20)  # room for two rows
    calls = []
    compute = lambda: calls.append(1) or rows  # noqa: E731
    cache.get("x", batch.index, compute)
    assert len(cache.rows["x"]) == 2 and cache.used <= cache.max_bytes
    cache.get("x", batch.index, compute)  # rows 2, 3 missing: recomputed
    assert len(calls) == 2
    two = batch.index[:2]
    assert cache.get("x", two, compute) is not None and len(calls) == 2 and cache.hits == 1
    cache.get("x", two, compute, valid=lambda b, row: False)  # a row that fails its check is recomputed
    assert len(calls) == 3
    assert RowCache(0).get("x", batch.index, compute) is rows and len(calls) == 4  # off
    # rows hold copies, not views of the batch
    z = {"a": torch.arange(6.0).view(3, 2)}
    r = unstack(z)
    z["a"].zero_()
    assert torch.equal(stack(r)["a"], torch.arange(6.0).view(3, 2))


def test_left_padded_rows_from_another_layout_are_recomputed(tok, tiny):
    """Under left padding a prompt's positions depend on its batch; a stored prefix whose token ids differ from
    the new layout is not used."""
    ex = mixed_length_examples(tok, 6)
    a, _ = batch_of(tok, examples=ex, padding_side="left")
    a.index = torch.arange(6)
    b, _ = batch_of(tok, examples=ex[:2], padding_side="left")  # shorter batch: less left padding
    b.index = a.index[:2]
    cache = RowCache(64)
    patched_last_logits(tiny, a, [], a.roles["last"], cache, "s")
    got = patched_last_logits(tiny, b, [], b.roles["last"], cache, "s")
    assert cache.hits == 0 and cache.misses == 2
    assert torch.allclose(got, last_logits(tiny, b), rtol=1e-5, atol=1e-5)


def test_a_patch_before_the_split_is_refused(tok, tiny):
    batch, _ = batch_of(tok, n=3)
    hs = HeadSet.at("query_label", [(1, 1)])
    src = capture(tiny, batch, hs)
    with pytest.raises(ValueError, match="split position"):
        patched_last_logits(tiny, batch, hs.patches(src, batch, 4), batch.roles["last"])
    assert torch.equal(earliest(batch, ["last", "query_label"]), batch.roles["query_label"])
    assert torch.equal(earliest(batch, []), batch.roles["last"])


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_shared_prefix_attention_equals_the_plain_forward(tok, arch):
    """k rows per prompt attending to the prompt's prefix K/V in place give the plain forward's hidden states at the
    suffix positions (GQA; q/k norms for Qwen3; Mistral's window)."""
    model = tiny_llama(len(tok), n_layers=3, n_heads=4, n_kv_heads=2, seed=2, arch=arch)
    A = LlamaFamily.of(model)
    batch, _ = batch_of(tok, n=3, padding_side="left", examples=mixed_length_examples(tok, 3))
    T = batch.input_ids.shape[1]
    ps = T - 4
    with LayerInputs(A, None) as h:
        full = A.base.model(**batch.model_inputs(), use_cache=True)
    cache = full.past_key_values
    k = 2
    rows = lambda t: t[:, None].expand(t.shape[0], k, *t.shape[1:]).reshape(-1, *t.shape[1:])  # noqa: E731
    pos = batch.position_ids[:, ps:]
    x = rows(h[1][:, ps:])
    cos, sin = A.base.model.rotary_emb(x, position_ids=rows(pos))
    with SharedPrefix(model, {j: cache.layers[j].keys[:, :, :ps] for j in range(3)},
                      {j: cache.layers[j].values[:, :, :ps] for j in range(3)}, batch.attention_mask[:, :ps].bool()):
        for j in (1, 2):
            x = A.layers[j](x, attention_mask=None, position_ids=rows(pos), position_embeddings=(cos, sin))
            x = x[0] if isinstance(x, tuple) else x
    assert model.config._attn_implementation != "etk_shared_prefix"  # restored
    want = rows(full.last_hidden_state[:, ps:])
    assert torch.allclose(A.final_norm(x), want, rtol=1e-5, atol=1e-5)


def test_unpatched_rows_give_the_plain_logits_and_a_prefix_for_any_later_patch(tok, tiny):
    """One plain forward yields the model's own logits and the prefix K/V that later patched runs (activation
    patching, CMAP) reuse; handing rows that do not cover the split is refused."""
    batch, _ = batch_of(tok, n=5, examples=mixed_length_examples(tok, 5))
    own = unpatched_rows(tiny, batch)
    assert torch.allclose(torch.stack([r["logits"] for r in own]), last_logits(tiny, batch), rtol=1e-5, atol=1e-5)
    hs = HeadSet.at("query_label", [(1, 1), (0, 2)])
    src = capture(tiny, batch_of(tok, n=5, seed=9, examples=mixed_length_examples(tok, 5, seed=9))[0], hs)
    p = hs.patches(src, batch, 4)
    a = patched_last_logits(tiny, batch, p, batch.roles["query_label"], rows=own)
    b = patched_last_logits(tiny, batch, p, batch.roles["query_label"])
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5) and not torch.allclose(a, torch.stack([r["logits"] for r in own]), atol=1e-3)
    short = prefix_rows(tiny, batch, batch.roles["query_label"] - 1)
    with pytest.raises(ValueError, match="do not cover"):
        patched_last_logits(tiny, batch, p, batch.roles["query_label"], rows=short)


def test_a_short_prefix_is_not_split_off_and_never_computed(tok, tiny):
    """When the earliest patch leaves less than `min_prefix` of the positions before it, the patched forward is one
    plain forward: no prefix rows are computed or stored, and the logits equal the split forward's."""
    batch, _ = batch_of(tok, n=4)
    batch.index = torch.arange(4)
    hs = HeadSet.at("query_label", [(1, 1)])
    src = capture(tiny, batch_of(tok, n=4, seed=5)[0], hs)
    until = batch.roles["query_label"]
    T = batch.input_ids.shape[1]
    assert split_position(batch, until, 0) == int(until.min()) and split_position(batch, until, 1) == 0
    assert split_position(batch, until, int(until.min()) / T) == int(until.min())
    cache = RowCache(64)
    plain = patched_last_logits(tiny, batch, hs.patches(src, batch, 4), until, cache, "s", min_prefix=1)
    assert cache.misses == 0 and not cache.rows  # nothing computed for a prefix
    split = patched_last_logits(tiny, batch, hs.patches(src, batch, 4), until, cache, "s", min_prefix=0)
    assert cache.misses == 1 and torch.allclose(plain, split, rtol=1e-5, atol=1e-5)
    # a prefix at hand costs nothing: given rows, the split is taken however short the prefix (so short rows fail)
    with pytest.raises(ValueError, match="do not cover"):
        patched_last_logits(tiny, batch, hs.patches(src, batch, 4), until, rows=prefix_rows(tiny, batch, until - 1),
                            min_prefix=1)
