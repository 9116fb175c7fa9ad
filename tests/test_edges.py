"""Edge attribution's graph (issue 26): which sender outputs make up which receiver inputs."""

from __future__ import annotations

from etk.methods.edge_attribution.graph import EdgeGraph, Receiver, Sender
from etk.models.arch import Dims


def test_the_graph_of_a_two_layer_gqa_model_counted_by_hand():
    """2 layers x 2 query heads sharing 1 KV group. Senders: embed, 2 heads + MLP per layer = 7; receivers: per layer
    2 q + 1 k + 1 v + the MLP, and the logits = 11. Edges: the embedding feeds all 11; each layer-0 head feeds the
    MLP of layer 0, the 5 receivers of layer 1 and the logits (7 each); MLP 0 feeds layer 1's 5 and the logits (6);
    each layer-1 head feeds MLP 1 and the logits (2 each); MLP 1 the logits (1): 11 + 14 + 6 + 4 + 1 = 36. No sender
    feeds a receiver of its own layer's heads (they read before any head writes) or anything earlier."""
    g = EdgeGraph.of(Dims(n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, d_model=8, vocab_size=10))
    assert len(g.senders) == 7 and len(g.receivers) == 11
    assert g.n_edges_per_role == 36
    valid = g.valid
    s, r = g.senders.index, g.receivers.index
    assert not valid[s(Sender("head", 0, 1)), r(Receiver("q", 0, 0))]  # a head never feeds its own layer's heads
    assert valid[s(Sender("head", 0, 1)), r(Receiver("mlp", 0, 0))]  # but the MLP after them
    assert valid[s(Sender("mlp", 0, 0)), r(Receiver("k", 1, 0))]
    assert not valid[s(Sender("mlp", 1, 0)), r(Receiver("v", 1, 0))]
    assert bool(valid[:, r(Receiver("logits", 2, 0))].all())


def test_the_rmsnorm_pullback_equals_autograd_through_the_models_own_norm():
    """J^T g of a tiny Llama's input norm (its own weight and eps) equals autograd's vector-Jacobian product."""
    import torch

    from etk.methods.edge_attribution.pullback import rmsnorm_pullback
    from etk.models.arch import LlamaFamily
    from etk.models.tiny import tiny_llama

    net = tiny_llama(50, n_layers=2, n_heads=4, n_kv_heads=2, seed=3)
    norm = LlamaFamily(net).input_norm(1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)  # not the identity weight, so the weight's place in the formula is tested
    r = torch.randn(3, 5, norm.weight.shape[0], requires_grad=True)
    g = torch.randn(3, 5, norm.weight.shape[0])
    (want,) = torch.autograd.grad(norm(r), r, g)  # the norm computes in fp32 whatever its input
    got = rmsnorm_pullback(norm.weight, norm.variance_epsilon, r.detach(), g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, norm.weight * g / r.detach().pow(2).mean(-1, keepdim=True).sqrt(), atol=1e-3)
