"""Head-level interventions: identity is bit-exact, patches take effect and match a hand-written hook,
interpolation end points, GQA mapping, padding invariance, hook hygiene."""

import pytest
import torch

from etk.interventions.components import UnknownHeadError, check_heads, kv_group
from etk.interventions.hooks import Capture, Patch, hooked
from etk.models.arch import LlamaFamily
from etk.models.forward import last_logits
from tests.helpers import batch_of, mixed_length_examples


def n_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def read(model, batch, site, layer, pos):
    with hooked(model, captures=[Capture(site, layer, pos)]) as cache:
        last_logits(model, batch)
    return cache[(site, layer)]


@pytest.fixture
def pair(tok):
    base, _ = batch_of(tok, n=6, n_boxes=3, seed=0)
    src, _ = batch_of(tok, n=6, n_boxes=3, seed=1)
    return base, src


def test_hooked_without_edits_equals_plain_model(tiny, pair):
    base, _ = pair
    plain = tiny(**base.model_inputs()).logits
    b = torch.arange(len(base))
    with hooked(tiny, captures=[Capture("z", 0)]):
        ours = last_logits(tiny, base)
    assert torch.allclose(ours, plain[b, base.roles["last"]], atol=1e-6)


def test_identity_patch_is_bit_exact(tiny, pair):
    base, _ = pair
    pos = torch.stack([base.roles["last"], base.roles["query_label"]], 1)  # [B, 2]
    clean = last_logits(tiny, base)
    z = read(tiny, base, "z", 1, pos)  # [B, 2, H, D]
    keep = torch.zeros(z.shape[:3], dtype=torch.bool)
    with hooked(tiny, patches=[Patch("z", 1, z, keep, pos)]):
        patched = last_logits(tiny, base)
    assert torch.equal(clean, patched)


def test_replace_one_head_changes_logits_and_matches_handwritten_hook(tiny, pair):
    base, src = pair
    layer, head = 1, 2
    pos_b, pos_s = base.roles["last"], src.roles["last"]
    arch = LlamaFamily(tiny)
    D = arch.dims.head_dim
    zs = read(tiny, src, "z", layer, pos_s[:, None])  # [B, 1, H, D]
    keep = torch.ones(zs.shape[:3], dtype=torch.bool)
    keep[:, :, head] = False
    clean = last_logits(tiny, base)
    with hooked(tiny, patches=[Patch("z", layer, zs, keep, pos_b[:, None])]):
        ours = last_logits(tiny, base)
    assert not torch.allclose(ours, clean)

    # independent computation: a plain pre-hook written by hand, per example
    def pre(mod, args):
        x = args[0].clone()
        for b in range(x.shape[0]):
            x[b, pos_b[b], head * D:(head + 1) * D] = zs[b, 0, head]
        return (x,)

    h = arch.proj(layer, "o_proj").register_forward_pre_hook(pre)
    try:
        ref = tiny(**base.model_inputs()).logits[torch.arange(len(base)), pos_b]
    finally:
        h.remove()
    assert torch.allclose(ours, ref, atol=1e-6)


def test_interpolation_endpoints_and_gradient(tiny, pair):
    base, src = pair
    pos_b, pos_s = base.roles["query_label"][:, None], src.roles["query_label"][:, None]
    zs = read(tiny, src, "z", 0, pos_s)
    clean = last_logits(tiny, base)
    H = zs.shape[2]
    with hooked(tiny, patches=[Patch("z", 0, zs, torch.ones(len(base), 1, H), pos_b)]):
        m1 = last_logits(tiny, base)
    assert torch.equal(m1, clean)
    with hooked(tiny, patches=[Patch("z", 0, zs, torch.zeros(len(base), 1, H), pos_b)]):
        m0 = last_logits(tiny, base)
    with hooked(tiny, patches=[Patch("z", 0, zs, torch.zeros(len(base), 1, H, dtype=torch.bool), pos_b)]):
        rep = last_logits(tiny, base)
    assert torch.allclose(m0, rep, atol=1e-6) and not torch.allclose(m0, clean)
    m = torch.full((H,), 0.5, requires_grad=True)
    with hooked(tiny, patches=[Patch("z", 0, zs, m.expand(len(base), 1, H), pos_b)]):
        last_logits(tiny, base).sum().backward()
    assert m.grad is not None and m.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_hooks_removed_even_on_error(tiny, pair):
    base, _ = pair
    before = n_hooks(tiny)
    with pytest.raises(RuntimeError):
        with hooked(tiny, captures=[Capture("z", 0), Capture("v", 1)]):
            assert n_hooks(tiny) == before + 2
            raise RuntimeError("boom")
    assert n_hooks(tiny) == before


def test_gqa_shapes_and_group_mapping(tiny, pair):
    base, _ = pair
    dims = LlamaFamily(tiny).dims
    assert (dims.n_heads, dims.n_kv_heads) == (4, 2)
    pos = base.roles["query_label"][:, None]
    for site, units in (("z", 4), ("q", 4), ("k", 2), ("v", 2)):
        assert read(tiny, base, site, 0, pos).shape == (len(base), 1, units, dims.head_dim)
    assert [kv_group(h, dims) for h in range(4)] == [0, 0, 1, 1]
    # v read equals the v_proj output by hand
    arch = LlamaFamily(tiny)
    captured = {}
    h = arch.proj(0, "v_proj").register_forward_hook(lambda m, a, o: captured.setdefault("v", o))
    try:
        last_logits(tiny, base)
    finally:
        h.remove()
    b = torch.arange(len(base))
    manual = captured["v"][b, pos[:, 0]].unflatten(-1, (2, dims.head_dim))
    assert torch.equal(read(tiny, base, "v", 0, pos)[:, 0], manual)
    # patching KV group 1 at the query label changes only the z of query heads 2 and 3
    v = read(tiny, base, "v", 0, pos)
    keep = torch.tensor([True, False]).expand(len(base), 1, 2)
    last = base.roles["last"][:, None]
    z_clean = read(tiny, base, "z", 0, last)
    with hooked(tiny, patches=[Patch("v", 0, v + 1.0, keep, pos)], captures=[Capture("z", 0, last)]) as c:
        last_logits(tiny, base)
    changed = (c[("z", 0)] - z_clean).abs().amax(dim=(0, 1, 3)) > 0  # [H]
    assert changed.tolist() == [False, False, True, True]


def test_q_patch_takes_effect(tiny, pair):
    base, src = pair
    pos = base.roles["last"][:, None]
    q = read(tiny, src, "q", 1, src.roles["last"][:, None])
    keep = torch.ones(q.shape[:3], dtype=torch.bool)
    keep[:, :, 0] = False
    clean = last_logits(tiny, base)
    with hooked(tiny, patches=[Patch("q", 1, q, keep, pos)]):
        assert not torch.allclose(last_logits(tiny, base), clean)


def test_full_sequence_patch_per_absolute_position(tiny, pair):
    base, _ = pair
    z = read(tiny, base, "z", 0, None)  # [B, T, H, D]
    mean = z.mean(0, keepdim=True)  # [1, T, H, D]
    keep = torch.ones(z.shape[:3], dtype=torch.bool)
    clean = last_logits(tiny, base)
    with hooked(tiny, patches=[Patch("z", 0, mean, keep)]):
        assert torch.equal(last_logits(tiny, base), clean)
    with hooked(tiny, patches=[Patch("z", 0, mean, ~keep)], captures=[Capture("z", 1)]):
        ablated = last_logits(tiny, base)
    assert not torch.allclose(ablated, clean)


def test_left_and_right_padding_agree(tiny, tok):
    exs = mixed_length_examples(tok, n=6)
    right, _ = batch_of(tok, examples=exs, padding_side="right")
    left, _ = batch_of(tok, examples=exs, padding_side="left")
    assert not torch.equal(right.input_ids, left.input_ids)
    assert torch.allclose(last_logits(tiny, right), last_logits(tiny, left), atol=1e-5)
    zr = read(tiny, right, "z", 1, right.roles["query_label"][:, None])
    zl = read(tiny, left, "z", 1, left.roles["query_label"][:, None])
    assert torch.allclose(zr, zl, atol=1e-5)


def test_unknown_head_is_a_clear_error(tiny):
    dims = LlamaFamily(tiny).dims
    assert check_heads([(1, 3)], dims) == [(1, 3)]
    with pytest.raises(UnknownHeadError, match=r"\(2, 0\).*2 layers x 4 heads"):
        check_heads([(2, 0)], dims)
    with pytest.raises(UnknownHeadError, match="KV groups"):
        check_heads([(0, 2)], dims, site="v")
