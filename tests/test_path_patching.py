"""Path patching: fast == naive (the definition) for all stages, GQA and padding; attribution agrees in rank;
a planted head is found; unreachable senders score exactly 0; the work counted by hand; paper artefacts round-trip."""

import json
from pathlib import Path

import pytest
import torch

from etk.circuits import Circuit, load_circuit, load_score_map, save_score_map, top_k
from etk.interventions.components import HeadId, all_heads
from etk.methods.path_patching.attribution import attribution_scores
from etk.methods.path_patching.fast import fast_scores
from etk.methods.path_patching.naive import naive_scores
from etk.methods.path_patching.run import rank_agreement
from etk.methods.path_patching.stages import pp_loader, reachable_layers, receivers_from, task_stages
from etk.models.arch import LlamaFamily
from etk.models.tiny import tiny_llama
from etk.tasks import task_named
from tests.helpers import RECV, assert_scores_close, mixed_length_examples, planted_model, pp_batch

FIX = Path(__file__).parent / "fixtures" / "path_patching"
PAPER_CIRCUITS = Path(__file__).resolve().parents[1] / "etk" / "data" / "circuits"


def stage_setup(model, group, recv_heads):
    dims = LlamaFamily(model).dims
    st = task_stages(task_named("entity_tracking"))[group]
    rec = None if st.receiver_site is None else receivers_from(recv_heads, st.receiver_site, dims)
    reach = [h for h in all_heads(dims) if h.layer in reachable_layers(st, rec, dims.n_layers)]
    return st, rec, reach, dims


@pytest.fixture(scope="module")
def deep_gqa(tok):
    return tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=3)


@pytest.fixture(scope="module")
def deep_mha(tok):
    return tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=4, seed=4)


@pytest.mark.parametrize("group", task_named("entity_tracking").group_names)
@pytest.mark.parametrize("model_name,side,mixed", [("deep_gqa", "right", False), ("deep_mha", "right", False),
                                                   ("deep_gqa", "left", True), ("deep_mha", "right", True)])
def test_fast_equals_naive(request, tok, group, model_name, side, mixed):
    model = request.getfixturevalue(model_name)
    batch = pp_batch(tok, side=side, mixed=mixed)
    st, rec, reach, dims = stage_setup(model, group, RECV)
    naive, _ = naive_scores(model, batch, st, rec, all_heads(dims))
    fast, cost = fast_scores(model, batch, st, rec, reach, chunk_rows=5)  # tiny chunks exercise the chunking
    n = len(batch)
    assert_scores_close(fast / n, naive / n)
    # unreachable senders: exactly 0 in the definition too
    unreachable = [h for h in all_heads(dims) if h not in reach]
    for h in unreachable:
        assert naive[h] == 0 and fast[h] == 0


def test_skipping_is_real(deep_gqa, tok):
    st, rec, reach, dims = stage_setup(deep_gqa, "struct_reader", [HeadId(2, 0)])
    assert {h.layer for h in reach} == {0, 1}  # senders in layers >= 2 cannot reach a layer-2 receiver


@pytest.mark.parametrize("group", task_named("entity_tracking").group_names)
def test_attribution_tracks_exact(deep_mha, tok, group):
    batch = pp_batch(tok, n=12)
    st, rec, reach, dims = stage_setup(deep_mha, group, RECV)
    exact, _ = fast_scores(deep_mha, batch, st, rec, reach)
    est, _ = attribution_scores(deep_mha, batch, st, rec, reach)
    mask = torch.zeros(dims.n_layers, dims.n_heads, dtype=torch.bool)
    for h in reach:
        mask[h] = True
    agree = rank_agreement(est, exact, 3, mask)
    assert agree["spearman"] > 0.8
    assert (est[~mask] == 0).all()


def test_planted_head_ranks_first(tok):
    m = planted_model(tok, head=2)
    batch = pp_batch(tok, n=14, n_boxes=1)
    st, rec, reach, dims = stage_setup(m, "value_fetcher", [])
    scores, _ = fast_scores(m, batch, st, rec, reach)
    scores = scores / len(batch)
    assert top_k(scores, 1) == [HeadId(1, 2)]
    assert scores[1, 2] < -0.5  # corrupting the head destroys the answer
    others = scores.clone()
    others[1, 2] = 0
    assert others.abs().max() < 1e-6  # no other head can change the logits


def test_paper_circuit_and_score_maps_roundtrip(tmp_path):
    for name in ("llama_7b", "goat_7b", "float_7b"):
        c = load_circuit(name)
        assert set(c.groups) == set(task_named("entity_tracking").group_names)
        c.save(tmp_path / f"{name}.json")
        again = load_circuit(tmp_path / f"{name}.json")
        assert again.groups == c.groups
        raw = json.loads((PAPER_CIRCUITS / f"{name}.json").read_text())
        assert {g: [list(h) for h in hs] for g, hs in again.groups.items()} == raw
    assert load_circuit("llama_7b").sizes() == {"value_fetcher": 40, "pos_transmitter": 7, "pos_detector": 20, "struct_reader": 5}
    for path in sorted(FIX.glob("*.json")):
        s = load_score_map(path)
        assert s.shape == (32, 32)
        save_score_map(tmp_path / path.name, s)
        assert torch.equal(load_score_map(tmp_path / path.name), s)
    # the paper's top-5 of the Llama PT map (SPEC §9.11) and its zero rows for unreachable senders
    pt = load_score_map(FIX / "llama_pos_transmitter.json")
    assert top_k(pt, 5)[:2] == [HeadId(14, 27), HeadId(11, 23)]
    assert (pt[30:] == 0).all() and (pt[:30] != 0).any()
    sr = load_score_map(FIX / "llama_struct_reader.json")
    assert (sr[13:] == 0).all() and int((sr == 0).sum()) == 608


def test_circuit_rejects_unknown_groups():
    with pytest.raises(ValueError, match="unknown circuit keys"):
        Circuit({"value_fetchers": [[0, 1]]})


@pytest.mark.parametrize("start", [0, 1, 3])
def test_partial_depth_forward_equals_plain(deep_gqa, tok, start):
    """The suffix-only, partial-depth forward used by the receiver step reproduces the plain forward."""
    from transformers import DynamicCache

    from etk.models.forward import output_cache
    from etk.models.partial import LayerInputs, forward_from_layer

    batch = pp_batch(tok, side="left", mixed=True).clean
    arch = LlamaFamily(deep_gqa)
    T, ps = batch.input_ids.shape[1], batch.input_ids.shape[1] - 4
    suffix = torch.arange(ps, T)[None].expand(len(batch), -1)
    with LayerInputs(arch, suffix) as h:
        out = arch.base.model(**batch.model_inputs(), use_cache=True)
    full = output_cache(out)
    cache = DynamicCache([(lay.keys[:, :, :ps], lay.values[:, :, :ps]) for lay in full.layers], config=arch.base.config)
    hid = forward_from_layer(deep_gqa, h[start], start, batch.attention_mask, batch.position_ids[:, ps:], cache)
    assert torch.allclose(hid, out.last_hidden_state[:, ps:], atol=1e-5)


def test_fast_equals_naive_relative_on_large_scores(tok):
    """Weights scaled up so that every stage's scores are large (>= 1e-3): fast matches the definition to a relative
    tolerance, stage after stage with the receivers each stage passes on."""
    model = tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(4.0)
    dims = LlamaFamily(model).dims
    batch = pp_batch(tok, n=10, n_boxes=4)
    prev = None
    for group in task_named("entity_tracking").group_names:
        st = task_stages(task_named("entity_tracking"))[group]
        rec = None if st.receiver_site is None else receivers_from(prev, st.receiver_site, dims)
        reach = reachable_layers(st, rec, dims.n_layers)
        naive = naive_scores(model, batch, st, rec, all_heads(dims))[0] / len(batch)
        fast = fast_scores(model, batch, st, rec, [h for h in all_heads(dims) if h.layer in reach])[0] / len(batch)
        scale = float(naive.abs().max())
        assert scale >= 1e-3, group
        assert torch.allclose(fast, naive, rtol=1e-3, atol=1e-4 * scale), (group, (fast - naive).abs().max())
        mask = torch.zeros(dims.n_layers, dims.n_heads, dtype=torch.bool)
        mask[reach] = True
        prev = top_k(fast, 4, mask)


def composition_chain(tok, sender=1, decoy=3, receiver=2):
    """A 2-layer model whose only writers are: layer-0 `sender` (token identity into a subspace S) and `decoy` (into
    S'), and layer-1 `receiver`, whose query and value read S (plus an object-finding key) and whose output writes
    the objects' identity to the logits. Composition runs sender -> receiver through q and v; the decoy reaches the
    receiver only through the normalisation."""
    from etk.data.vocab import load_objects, single_token_id

    m = tiny_llama(len(tok), n_layers=2, n_heads=4, n_kv_heads=2, d_model=128, seed=5)
    arch = LlamaFamily(m)
    D, gs, d = arch.dims.head_dim, arch.dims.group_size, 128
    is_obj = torch.zeros(arch.lm_head.weight.shape[0], dtype=torch.bool)
    is_obj[[i for i in (single_token_id(tok, w) for w in load_objects()) if i is not None]] = True
    g = torch.Generator().manual_seed(1)

    def basis(lo, hi):  # an orthonormal D-dim basis inside dims [lo, hi), zero elsewhere: [d, D]
        out = torch.zeros(d, D)
        out[lo:hi] = torch.linalg.qr(torch.randn(hi - lo, D, generator=g))[0]
        return out

    with torch.no_grad():
        emb = arch.base.model.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape, generator=g))
        emb[:, 64:] = 0
        emb[:, 0], emb[:, 1] = 1.0, torch.where(is_obj, 3.0, 0.0)
        for j in range(2):
            for n in ("q_proj", "k_proj", "o_proj"):
                arch.proj(j, n).weight.zero_()
            arch.mlp(j).down_proj.weight.zero_()
        ident, S, S2 = basis(2, 64), basis(64, 96), basis(96, 128)
        for h, out in ((sender, S), (decoy, S2)):  # uniform attention (q = 0), values = token identity
            arch.proj(0, "v_proj").weight[(h // gs) * D:(h // gs + 1) * D] = ident.T * 4
            arch.proj(0, "o_proj").weight[:, h * D:(h + 1) * D] = out * 0.5
        slow, r, gr = D // 2 - 1, receiver, receiver // gs
        arch.proj(1, "q_proj").weight[r * D:(r + 1) * D] = S.T * 6
        arch.proj(1, "q_proj").weight[r * D + slow, 0] = 20.0
        arch.proj(1, "k_proj").weight[gr * D + slow, 1] = 1.0
        arch.proj(1, "v_proj").weight[gr * D:(gr + 1) * D] = S.T * 8
        arch.proj(1, "o_proj").weight[:, r * D:(r + 1) * D] = ident
        arch.lm_head.weight.copy_(emb * 0.5)
        arch.lm_head.weight[~is_obj] = 0
        arch.lm_head.weight[~is_obj, 0] = -20.0
    return m.eval()


@pytest.mark.parametrize("group", ["pos_transmitter", "pos_detector", "struct_reader"])
def test_planted_q_and_v_composition_is_ranked_first(tok, group):
    """PT (through the receiver's q at `last`), PD and SR (through its v at query_label / prev_query_label) rank the
    planted sender first, far above the decoy; heads that write nothing score 0 in the definition. In float64: the
    planted effects are ~5e-5, within a few fp32 ulps of the noise of a relative-probability score."""
    model = composition_chain(tok).double()
    dims = LlamaFamily(model).dims
    batch = pp_batch(tok, n=12, n_boxes=3)
    st = task_stages(task_named("entity_tracking"))[group]
    rec = receivers_from([HeadId(1, 2)], st.receiver_site, dims)
    reach = [h for h in all_heads(dims) if h.layer in reachable_layers(st, rec, dims.n_layers)]
    naive = naive_scores(model, batch, st, rec, all_heads(dims))[0] / len(batch)
    fast = fast_scores(model, batch, st, rec, reach)[0] / len(batch)
    for s in (naive, fast):
        assert top_k(s, 1)[0] == (0, 1)
        assert abs(float(s[0, 1])) > 5 * abs(float(s[0, 3]))
        assert abs(float(s[0, 0])) < 1e-12 and abs(float(s[0, 2])) < 1e-12
    assert torch.allclose(fast, naive, rtol=1e-6, atol=1e-6 * float(naive.abs().max()))


def test_structure_reader_with_mixed_box_counts(tok, deep_gqa):
    """Prompts of 2-4 boxes in one batch: every prompt keeps its label positions (padded with -1), corrupt prompts
    come from contexts of every size (contexts are told apart by content, not by their reused sample ids), and the
    SR stage's fast scores still equal the definition."""
    from etk.tasks.entity_tracking.pairs import path_patching_pairs

    exs = mixed_length_examples(tok, n=12, seed=2)
    assert len({e.context.sample_id for e in exs}) < len({e.context for e in exs})  # ids collide across box counts
    pairs = path_patching_pairs(exs, __import__("random").Random(0))
    assert {p.source.context.n_boxes for p in pairs} == {2, 3, 4}
    assert all(0 <= p.source_box < p.source.context.n_boxes for p in pairs)
    batch = next(iter(pp_loader(task_named("entity_tracking"), tok, exs, seed=0, batch_size=12, padding_side="right")))
    labels = batch.corrupt.roles["labels"]
    assert labels.shape == (12, 4) and (labels[:, :2] >= 0).all() and (labels == -1).any()
    p_s, p_c = batch.positions(task_stages(task_named("entity_tracking"))["struct_reader"])
    assert (p_c >= 0).all() and torch.equal(batch.corrupt.input_ids[torch.arange(12), p_c] >= 0, torch.ones(12, dtype=torch.bool))
    st, rec, reach, dims = stage_setup(deep_gqa, "struct_reader", RECV)
    naive = naive_scores(deep_gqa, batch, st, rec, all_heads(dims))[0] / 12
    fast = fast_scores(deep_gqa, batch, st, rec, reach)[0] / 12
    assert_scores_close(fast, naive)


def test_prompts_whose_clean_probability_underflows_are_left_out_of_the_mean(tmp_path):
    """p_clean == 0 has no relative change: such a prompt adds 0 to the sum and is not counted in the mean; a score
    map with undefined (null) entries loads as NaN and NaN heads are never picked."""
    from etk.circuits import load_score_map, save_score_map, top_k
    from etk.methods.path_patching.naive import per_clean, undefined_prompts

    p_clean = torch.tensor([0.5, 0.0, 0.25])
    p = torch.tensor([[0.25, 0.5], [0.3, 0.1], [0.5, 0.25]])
    rel = per_clean(p - p_clean[:, None], p_clean)
    assert torch.equal(rel, torch.tensor([[-0.5, 0.0], [0.0, 0.0], [1.0, 0.0]]))
    assert undefined_prompts(p_clean) == 1
    scores = torch.tensor([[float("nan"), -0.2], [-0.1, 0.3]])
    path = save_score_map(tmp_path / "s.json", scores)
    back = load_score_map(path)
    assert torch.isnan(back[0, 0]) and torch.equal(back[1], scores[1])
    assert top_k(back, 4) == [(0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("group", task_named("entity_tracking").group_names)
def test_speed_of_light_minimum_bounds_the_work(deep_gqa, tok, group):
    """The definition's minimum (token, layer) blocks: more than the two plain forwards alone; never more than what
    fast or naive do; naive does far more. (The count itself: test_minimum_blocks_counted_by_hand.)"""
    from etk.methods.path_patching.stages import minimum_blocks

    batch = pp_batch(tok, n=6)
    st, rec, reach, dims = stage_setup(deep_gqa, group, RECV)
    L = dims.n_layers
    low = minimum_blocks(batch, st, rec, reach, L)
    forwards_only = minimum_blocks(batch, st, rec, [], L)  # no senders: the clean and the corrupt forward
    _, fast = fast_scores(deep_gqa, batch, st, rec, reach)
    _, naive = naive_scores(deep_gqa, batch, st, rec, reach)
    assert forwards_only < low <= fast["token_layer_blocks"] and fast["token_layer_blocks"] < naive["token_layer_blocks"]


def test_minimum_blocks_counted_by_hand():
    """A 2-prompt batch small enough to count the blocks on paper: 5 and 4 real tokens (right-padded to 5), `last`
    at 4 and 3, the sender position p_s at 2 and 1; 4 layers."""
    from types import SimpleNamespace

    from etk.methods.path_patching.stages import Receivers, minimum_blocks

    class HandBatch:  # what minimum_blocks reads of a path-patching batch
        clean = SimpleNamespace(attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
                                roles={"last": torch.tensor([4, 3])})

        def __len__(self):
            return 2

        def positions(self, stage):
            return torch.tensor([2, 1]), torch.tensor([2, 1])

    b, L = HandBatch(), 4
    # no senders, the clean and the corrupt forward only: 2 forwards x 9 real tokens x 4 layers = 72
    assert minimum_blocks(b, task_stages(task_named("entity_tracking"))["value_fetcher"], None, [], L) == 72
    # direct effect, senders in layers 0, 2, 3: per prompt each sender's chain at p_s up to the top,
    # (4 - 0) + (4 - 2) + (4 - 3) = 7 blocks; 2 prompts: 14; 72 + 14 = 86
    assert minimum_blocks(b, task_stages(task_named("entity_tracking"))["value_fetcher"], None, [HeadId(0, 1), HeadId(2, 0), HeadId(3, 3)], L) == 86
    # receivers in layers 2 and 3, senders in layers 0, 1, 2:
    #   per prompt each sender's chain at p_s up to the deepest receiver (layer 3): 3 + 2 + 1 = 6; 2 prompts: 12
    #   the suffixes p_s..last hold 3 (2..4) + 3 (1..3) = 6 tokens, each run from the shallowest receiver above the
    #   sender to the top: layers 2-3 for the senders in 0 and 1 (2 + 2), layer 3 for the one in 2 (1): 6 x 5 = 30
    #   but at the top layer (3) only `last` is read: the 6 - 2 = 4 suffix tokens before it, for each of the 3
    #   senders, drop out: 30 - 12 = 18
    #   72 + 12 + 18 = 102
    rec = Receivers("v", {2: [0], 3: [1]})
    assert minimum_blocks(b, task_stages(task_named("entity_tracking"))["pos_detector"], rec, [HeadId(0, 1), HeadId(1, 0), HeadId(2, 3)], L) == 102
