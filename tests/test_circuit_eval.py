"""Circuit evaluation: mean ablation against a slow reference, identity and full ablation, a planted head's
faithfulness, random baselines without repeats, completeness, minimality, and the paper's overlap table."""

import random

import pytest
import torch

from etk.circuits import Circuit, load_circuit, overlap
from etk.methods.completeness.completeness import completeness
from etk.methods.mean_ablation.ablation import all_heads_ablation, circuit_ablation, full_model
from etk.methods.mean_ablation.summary import faithfulness, random_ablation
from etk.methods.minimality.minimality import minimality
from etk.models.arch import LlamaFamily
from etk.models.forward import last_logits
from etk.tasks import task_named
from tests.helpers import batch_of, evaluator, means_of, planted_model, run_ablations


def slow_reference(model, batch, means, circuit: Circuit, ablate_non_vital: bool):
    """Loop-based mean ablation (test-only): per example, position, layer and head, from the SPEC's rule: at a vital
    position keep the circuit's heads of that position's role, elsewhere keep all heads or none."""
    arch = LlamaFamily(model)
    D, H = arch.dims.head_dim, arch.dims.n_heads
    handles = []
    for layer in range(arch.dims.n_layers):
        def pre(mod, args, layer=layer):
            x = args[0].clone()
            for b in range(x.shape[0]):
                vital = {int(batch.roles[r][b]): i for i, r in enumerate(task_named("entity_tracking").vital_roles)}
                for t in range(x.shape[1]):
                    for h in range(H):
                        keep = ((layer, h) in circuit.heads_at(task_named("entity_tracking").vital_roles[vital[t]]) if t in vital
                                else not ablate_non_vital)
                        if not keep:
                            x[b, t, h * D:(h + 1) * D] = means[layer, t, h]
            return (x,)
        handles.append(arch.proj(layer, "o_proj").register_forward_pre_hook(pre))
    try:
        return last_logits(model, batch)
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def setup(tok):
    from etk.models.tiny import tiny_llama

    model = tiny_llama(len(tok), n_layers=3, n_heads=4, n_kv_heads=2, seed=7)
    batch, _ = batch_of(tok, n=8, n_boxes=3, seed=2)
    return model, batch, means_of(model, batch), LlamaFamily(model).dims


def test_mean_ablation_hook_equals_slow_reference(setup):
    model, batch, means, dims = setup
    circ = Circuit({"value_fetcher": [[2, 1], [1, 3]], "pos_detector": [[0, 0]], "struct_reader": [[1, 2]]})
    for flag in (True, False):
        fast = run_ablations(model, batch, means, [circuit_ablation(circ, dims, flag)])[0]
        assert torch.allclose(fast, slow_reference(model, batch, means, circ, flag), atol=1e-5)


def test_ablating_nothing_is_the_model_exactly(setup):
    model, batch, means, dims = setup
    everything = Circuit({g: [[lay, h] for lay in range(dims.n_layers) for h in range(dims.n_heads)]
                          for g in ("value_fetcher", "pos_detector", "struct_reader")})
    plain = last_logits(model, batch)
    for ab in (full_model(dims), circuit_ablation(everything, dims, ablate_non_vital=False)):
        assert torch.equal(run_ablations(model, batch, means, [ab])[0], plain)


def test_ablating_everything_gives_the_mean_only_prediction(setup):
    model, batch, means, dims = setup
    nothing = circuit_ablation(Circuit({}), dims, True)
    out = run_ablations(model, batch, means, [nothing])[0]
    # every head output everywhere is its mean: the prediction no longer depends on which example it is
    arch = LlamaFamily(model)
    handles = [arch.proj(j, "o_proj").register_forward_pre_hook(
        lambda mod, args, j=j: (means[j][None].expand_as(args[0].unflatten(-1, (dims.n_heads, dims.head_dim))).flatten(-2),))
        for j in range(dims.n_layers)]
    try:
        ref = last_logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, last_logits(model, batch), atol=1e-3)


def test_many_ablations_per_forward_equal_one_at_a_time(setup):
    model, batch, means, dims = setup
    rng = random.Random(0)
    circ = Circuit({"value_fetcher": [[0, 0], [1, 1], [2, 2]], "pos_detector": [[0, 1], [1, 0]], "struct_reader": [[2, 3]]})
    abls = [random_ablation(circuit_ablation(circ, dims, bool(i % 2)), dims, rng, f"r{i}") for i in range(4)]
    together = run_ablations(model, batch, means, abls)
    for i, ab in enumerate(abls):
        assert torch.allclose(together[i], run_ablations(model, batch, means, [ab])[0], atol=1e-5)


def test_random_baseline_never_repeats_a_head(setup):
    _, _, _, dims = setup
    n = dims.n_layers * dims.n_heads
    rng = random.Random(5)
    heads = [[lay, h] for lay in range(dims.n_layers) for h in range(dims.n_heads)]
    like = circuit_ablation(Circuit({"value_fetcher": heads[:-1], "pos_detector": heads, "struct_reader": heads[:5]}), dims)
    for _ in range(20):
        ab = random_ablation(like, dims, rng, "r")
        assert ab.heads_per_role() == {"last": n - 1, "query_label": n, "prev_query_label": 5}


@pytest.fixture(scope="module")
def planted(tok):
    model = planted_model(tok, head=2)
    batch, _ = batch_of(tok, n=24, n_boxes=1, seed=3)
    ab_batch, _ = batch_of(tok, n=24, n_boxes=1, seed=4)
    return model, batch, means_of(model, ab_batch), LlamaFamily(model).dims


def test_planted_head_is_faithful_and_random_heads_are_not(planted):
    model, batch, means, dims = planted
    ev = evaluator(model, batch, means)
    r = faithfulness(ev, Circuit({"value_fetcher": [[1, 2]]}), dims, n_random=10, seed=0)
    assert r["accuracy_model"] == 1.0 and r["faithfulness"] == 1.0
    other = faithfulness(ev, Circuit({"value_fetcher": [[1, 0]]}), dims, n_random=0)
    assert other["faithfulness"] < 0.2  # a wrong head: mean-ablating the planted one leaves ~chance
    assert r["random"]["faithfulness_mean"] < 0.5  # random one-head circuits mostly miss it
    assert r["ci_low"] <= 1.0 <= r["ci_high"]


def test_completeness_on_planted(planted):
    model, batch, means, dims = planted
    circ = Circuit({"value_fetcher": [[1, 2], [0, 1]]})
    r = completeness(evaluator(model, batch, means), circ, dims, n_random=6, seed=1)
    vf = r["groups"]["value_fetcher"]
    assert vf["F_C_minus_K"] < 0.2 and vf["F_M_minus_K"] < 0.2 and vf["incompleteness"] < 0.2
    assert len(r["draws"]) == 6 and all(0 <= d["incompleteness"] <= 1 for d in r["draws"])


def test_completeness_of_named_head_sets_is_the_ablation_of_their_heads(planted):
    """K = a named circuit's heads that the circuit has (the study's shared / added parts): the planted head as K
    breaks both the circuit and the model; a K of only the idle head breaks neither; a head outside the circuit is
    not in K."""
    model, batch, means, dims = planted
    circ = Circuit({"value_fetcher": [[1, 2], [0, 1]]})
    named = {"planted": Circuit({"value_fetcher": [[1, 2], [0, 3]]}), "idle": Circuit({"value_fetcher": [[0, 1]]})}
    r = completeness(evaluator(model, batch, means), circ, dims, n_random=0, seed=1, named=named)
    planted_k, idle_k = r["named"]["planted"], r["named"]["idle"]
    assert planted_k["size"] == 1 and idle_k["size"] == 1  # [0, 3] is not in the circuit
    assert planted_k["F_M_minus_K"] < 0.2 and planted_k["F_C_minus_K"] < 0.2
    assert idle_k["F_M_minus_K"] == 1.0 and idle_k["F_C_minus_K"] == 1.0 and idle_k["incompleteness"] == 0.0
    assert set(r["groups"]) == {"value_fetcher"}


@pytest.mark.parametrize("mode", ["batched", "greedy"])
def test_minimality_prunes_to_the_planted_head(planted, mode):
    model, batch, means, dims = planted
    circ = Circuit({"value_fetcher": [[1, 2], [1, 0], [0, 1], [0, 3]], "struct_reader": [[0, 2]]})
    evaluate, done = evaluator(model, batch, means), []

    def counting(ablations):  # the evaluations made, counted where they are made
        done.append(len(ablations))
        return evaluate(ablations)

    ref, n_ref = minimality(counting, circ, dims, threshold=0.01, mode=mode, reference=True), sum(done)
    done.clear()
    r = minimality(counting, circ, dims, threshold=0.01, mode=mode)
    assert len(done) <= 2  # at most two evaluation rounds (rankings, significance tests) for both groups together
    assert r["groups"] == ref["groups"] and r["circuit"].groups == ref["circuit"].groups  # the same accuracies
    assert r["evaluated"] == sum(done) < n_ref == ref["evaluated"]  # repeated ablations evaluated once
    assert r["circuit"].groups["value_fetcher"] == [(1, 2)]
    assert r["circuit"].groups["struct_reader"] == []
    sr, vf = r["groups"]["struct_reader"], r["groups"]["value_fetcher"]
    # Counted by hand. The paper's procedure, per group of n heads: every drop of one or two heads, n(n+1)/2
    # ablations, then 2 per head for the significance test (before / after): VF (n=4) 10 + 8 = 18, SR (n=1) 1 + 2 = 3.
    # Greedy ranks the partners by single drops instead, n + 1 ablations: VF 5 + 8 = 13, SR 2 + 2 = 4.
    assert (vf["paper_evaluations"], sr["paper_evaluations"]) == (18, 3)
    assert (vf["evaluations"], sr["evaluations"]) == ((18, 3) if mode == "batched" else (13, 4))
    assert n_ref == vf["evaluations"] + sr["evaluations"]  # what it reports is what the procedure asks for


SPEC_OVERLAP = {  # SPEC §9.5: shared (precision, recall)
    ("llama_7b", "goat_7b"): {"value_fetcher": (27, .68, .40), "pos_transmitter": (6, .86, .21),
                              "pos_detector": (16, .80, .40), "struct_reader": (5, 1.00, .13)},
    ("llama_7b", "float_7b"): {"value_fetcher": (27, .68, .40), "pos_transmitter": (7, 1.00, .24),
                               "pos_detector": (15, .75, .38), "struct_reader": (5, 1.00, .13)},
    ("goat_7b", "float_7b"): {"value_fetcher": (40, .59, .59), "pos_transmitter": (18, .64, .62),
                              "pos_detector": (28, .70, .70), "struct_reader": (27, .69, .71)},
}


@pytest.mark.parametrize("pair", sorted(SPEC_OVERLAP))
def test_paper_overlap_table(pair):
    got = overlap(load_circuit(pair[0]), load_circuit(pair[1]))
    for g, (n, p, r) in SPEC_OVERLAP[pair].items():
        assert got[g]["shared"] == n
        assert round(got[g]["precision"], 2) == p and round(got[g]["recall"], 2) == r


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_vital_only_fast_path_equals_full_forward(tok, padding_side):
    """Recomputing only the three vital tokens on the all-ablated background gives the full forward's logits."""
    from etk.methods.mean_ablation.vital import background, vital_logits, vital_only
    from etk.models.tiny import tiny_llama
    from tests.helpers import mixed_length_examples

    model = tiny_llama(len(tok), n_layers=3, n_heads=4, n_kv_heads=2, seed=11)
    batch, _ = batch_of(tok, examples=mixed_length_examples(tok, n=9, seed=1), padding_side=padding_side)
    means = means_of(model, batch)
    dims = LlamaFamily(model).dims
    rng = random.Random(3)
    circ = circuit_ablation(Circuit({"value_fetcher": [[0, 1], [2, 3]], "pos_detector": [[1, 0]],
                                     "struct_reader": [[0, 2], [1, 1]]}), dims)
    abls = [circ, circuit_ablation(Circuit({}), dims)] + [random_ablation(circ, dims, rng, f"r{i}") for i in range(3)]
    assert all(vital_only(a) for a in abls)
    fast = vital_logits(model, batch, means, abls, background(model, batch, means)).view(len(abls), len(batch), -1)
    full = run_ablations(model, batch, means, abls)
    assert torch.allclose(fast, full, atol=1e-5, rtol=1e-4)
    assert torch.equal(fast.argmax(-1), full.argmax(-1))
    assert not torch.allclose(fast[0], fast[1], atol=1e-3)  # the kept heads matter


def test_vital_only_is_detected_from_the_kept_roles(setup):
    from etk.methods.mean_ablation.vital import vital_only

    _, _, _, dims = setup
    circ = circuit_ablation(Circuit({"value_fetcher": [[0, 1]]}), dims)
    assert vital_only(circ) and vital_only(all_heads_ablation(dims))
    assert not vital_only(circuit_ablation(Circuit({"value_fetcher": [[0, 1]]}), dims, ablate_non_vital=False))
    assert not vital_only(circ.plus([("correct_object", 0, 1)]))
