"""The one head-set type: construction from circuits, union, random-like draws, the KV-group view, the mean-
ablation table, and its patches (replace / interpolate) against a hand-written hook."""

import random

import pytest
import torch

from etk.circuits import Circuit
from etk.data.roles import ROLE_ID
from etk.interventions.components import UnknownHeadError
from etk.interventions.heads import HeadSet, capture
from etk.interventions.hooks import hooked
from etk.models.arch import LlamaFamily
from etk.models.forward import last_logits
from tests.helpers import batch_of


def test_from_circuit_merges_groups_at_a_role_and_keeps_order():
    c = Circuit({"value_fetcher": [[1, 2], [0, 1]], "pos_transmitter": [[0, 1], [1, 3]], "struct_reader": [[0, 0]],
                 "sep": [[1, 1]]})
    hs = HeadSet.from_circuit(c)
    assert hs.roles == {"last": [(1, 2), (0, 1), (1, 3)], "prev_query_label": [(0, 0)], "sep": [(1, 1)]}
    assert len(hs) == 5 and hs.layers("last") == [0, 1] and hs.by_layer("last") == {0: [(1, 1)], 1: [(0, 2), (2, 3)]}
    assert HeadSet.from_circuit(c, ["struct_reader"]).roles == {"prev_query_label": [(0, 0)]}
    with pytest.raises(ValueError, match="unknown position role"):
        HeadSet({"value_fetcher": [(0, 0)]})  # groups are translated by from_circuit, not taken as roles


def test_random_like_draws_without_replacement_per_role(tiny):
    dims = LlamaFamily(tiny).dims
    n = dims.n_layers * dims.n_heads
    hs = HeadSet({"last": [(la, h) for la in range(dims.n_layers) for h in range(dims.n_heads)][:n - 1],
                  "query_label": [(0, 0), (1, 1)]})
    for seed in range(10):
        r = hs.random_like(dims, random.Random(seed))
        assert {k: len(v) for k, v in r.roles.items()} == {"last": n - 1, "query_label": 2}
        assert len(set(r.heads("last"))) == n - 1


def test_kv_group_view_and_keep_table(tiny):
    dims = LlamaFamily(tiny).dims  # 4 heads over 2 KV groups
    hs = HeadSet.at("query_label", [(1, 0), (1, 1), (1, 3), (0, 2)])
    assert hs.kv_groups("query_label", dims) == {0: [1], 1: [0, 1]}
    t = hs.keep(dims)
    assert t.shape == (len(ROLE_ID), dims.n_layers, dims.n_heads) and int(t.sum()) == 4
    assert t[ROLE_ID["query_label"], 1, 3] and not t[ROLE_ID["last"]].any()
    with pytest.raises(UnknownHeadError):
        HeadSet.at("last", [(5, 0)]).keep(dims)


def test_patches_replace_and_interpolate_like_a_hand_written_hook(tiny, tok):
    batch, _ = batch_of(tok, n=6, n_boxes=3)
    other, _ = batch_of(tok, n=6, n_boxes=3, seed=5)
    hs = HeadSet({"last": [(1, 2)], "query_label": [(0, 1), (0, 3)]})
    src = capture(tiny, other, hs)  # z of the other prompts at their own roles
    weights = torch.tensor([0.25, 1.0, 0.0])  # per head, role by role: (1,2)@last, (0,1)@ql, (0,3)@ql
    b = torch.arange(6)
    want = {0: [(1, batch.roles["query_label"], src[("query_label", 0)][:, 0, 1], 1.0),
                (3, batch.roles["query_label"], src[("query_label", 0)][:, 0, 3], 0.0)],
            1: [(2, batch.roles["last"], src[("last", 1)][:, 0, 2], 0.25)]}

    def pre(j):
        def hook(mod, args):
            x = args[0].clone().unflatten(-1, (4, 16))
            for h, pos, z, w in want[j]:
                x[b, pos, h] = w * x[b, pos, h] + (1 - w) * z
            return (x.flatten(-2),)
        return hook

    handles = [tiny.model.layers[j].self_attn.o_proj.register_forward_pre_hook(pre(j)) for j in (0, 1)]
    try:
        ref = last_logits(tiny, batch)
    finally:
        for h in handles:
            h.remove()
    with hooked(tiny, patches=hs.patches(src, batch, 4, weights)):
        got = last_logits(tiny, batch)
    assert torch.allclose(got, ref, atol=1e-6)
    with hooked(tiny, patches=hs.patches(src, batch, 4, torch.ones(3))):
        ones = last_logits(tiny, batch)
    assert torch.equal(ones, last_logits(tiny, batch))  # all weights 1: an exact no-op
    with hooked(tiny, patches=hs.patches(src, batch, 4, torch.zeros(3, dtype=torch.bool))):
        replaced = last_logits(tiny, batch)
    with hooked(tiny, patches=hs.patches(src, batch, 4)):
        assert torch.equal(last_logits(tiny, batch), replaced)
    assert not torch.allclose(replaced, last_logits(tiny, batch), atol=1e-4)
