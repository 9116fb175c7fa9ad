"""Path patching: fast == naive (the definition) for all stages, GQA and padding; attribution agrees in rank;
a planted head is found; unreachable senders score exactly 0; determinism; paper artefacts round-trip."""

import json
from pathlib import Path

import pytest
import torch

from etk.circuits import (
    GROUPS,
    Circuit,
    load_circuit,
    load_score_map,
    save_score_map,
    top_k,
)
from etk.data.boxes import generate_examples
from etk.data.datasets import task_vocab
from etk.interventions.components import HeadId, all_heads
from etk.methods.path_patching.attribution import attribution_scores
from etk.methods.path_patching.fast import fast_scores
from etk.methods.path_patching.naive import naive_scores
from etk.methods.path_patching.run import rank_agreement
from etk.methods.path_patching.stages import (
    STAGES,
    pp_loader,
    reachable_layers,
    receivers_from,
)
from etk.models.arch import LlamaFamily
from etk.models.tiny import tiny_llama
from tests.helpers import mixed_length_examples, planted_model

FIX = Path(__file__).parent / "fixtures" / "path_patching"
PAPER_CIRCUITS = Path(__file__).resolve().parents[1] / "etk" / "data" / "circuits"


def pp_batch(tok, n=10, n_boxes=4, side="right", seed=0, mixed=False):
    if mixed:
        exs = mixed_length_examples(tok, n=n, seed=seed)
    else:
        objects, labels = task_vocab(tok, n_boxes)
        exs = generate_examples(n, n_boxes, objects, labels, seed)
    return next(iter(pp_loader(tok, exs, seed=seed, batch_size=n, padding_side=side)))


def stage_setup(model, group, recv_heads):
    dims = LlamaFamily(model).dims
    st = STAGES[group]
    rec = None if st.receiver_site is None else receivers_from(recv_heads, st.receiver_site, dims)
    reach = [h for h in all_heads(dims) if h.layer in reachable_layers(st, rec, dims.n_layers)]
    return st, rec, reach, dims


@pytest.fixture(scope="module")
def deep_gqa(tok):
    return tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=3)


@pytest.fixture(scope="module")
def deep_mha(tok):
    return tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=4, seed=4)


RECV = [HeadId(3, 1), HeadId(2, 0), HeadId(2, 3), HeadId(1, 2)]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("model_name,side,mixed", [("deep_gqa", "right", False), ("deep_mha", "right", False),
                                                   ("deep_gqa", "left", True), ("deep_mha", "right", True)])
def test_fast_equals_naive(request, tok, group, model_name, side, mixed):
    model = request.getfixturevalue(model_name)
    batch = pp_batch(tok, side=side, mixed=mixed)
    st, rec, reach, dims = stage_setup(model, group, RECV)
    naive, _ = naive_scores(model, batch, st, rec, all_heads(dims))
    fast, cost = fast_scores(model, batch, st, rec, reach, chunk_rows=5)  # tiny chunks exercise the chunking
    n = len(batch)
    assert (naive / n - fast / n).abs().max() <= 1e-5
    assert naive.abs().max() > 0
    # unreachable senders: exactly 0 in the definition too
    unreachable = [h for h in all_heads(dims) if h not in reach]
    for h in unreachable:
        assert naive[h] == 0 and fast[h] == 0


def test_skipping_is_real(deep_gqa, tok):
    st, rec, reach, dims = stage_setup(deep_gqa, "struct_reader", [HeadId(2, 0)])
    assert {h.layer for h in reach} == {0, 1}  # senders in layers >= 2 cannot reach a layer-2 receiver


def test_scores_are_deterministic(deep_gqa, tok):
    st, rec, reach, _ = stage_setup(deep_gqa, "pos_detector", RECV)
    a, _ = fast_scores(deep_gqa, pp_batch(tok, seed=1), st, rec, reach)
    b, _ = fast_scores(deep_gqa, pp_batch(tok, seed=1), st, rec, reach)
    assert torch.equal(a, b)


@pytest.mark.parametrize("group", GROUPS)
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
        assert set(c.groups) == set(GROUPS)
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
