"""Circuit quality: the all-heads reference, faithfulness curves (CPR/CMD), and the position-aware circuit search,
on planted tiny models whose mechanism is known."""

import json
import math

import pytest
import torch

from etk.circuits import Circuit, load_circuit
from etk.data.roles import ROLE_ID, ROLE_VOCAB
from etk.interventions.hooks import hooked
from etk.methods.circuit_search.search import UnitAttribution, exact_removal_effects, grow_and_prune
from etk.methods.faithfulness_curve.curve import curve_circuits, integrated, ranked_heads
from etk.methods.mean_ablation.ablation import Ablation, ablation_patches, all_heads_ablation, empty_keep, full_model
from etk.methods.mean_ablation.summary import faithfulness
from etk.models.arch import LlamaFamily
from etk.models.forward import last_logits
from etk.tasks import task_named
from tests.helpers import batch_of, compose_run, evaluator, means_of, planted_model, run_ablations


@pytest.fixture(scope="module")
def relay(tok):
    """The answer is relayed by head (0, 1) at the object's own position and read by (1, 2) at `last`."""
    model = planted_model(tok, head=2, mechanism="object_relay")
    batch, _ = batch_of(tok, n=24, n_boxes=1, seed=3)
    ab_batch, _ = batch_of(tok, n=24, n_boxes=1, seed=4)
    return model, batch, means_of(model, ab_batch), LlamaFamily(model).dims


def logp_of(model, batch, means, ablations):
    logits = run_ablations(model, batch, means, ablations)  # [K, N, V]
    return logits.log_softmax(-1).gather(-1, batch.answer[None, :, None].expand(len(ablations), -1, 1))[..., 0]


def test_all_heads_reference_is_below_one_when_the_answer_needs_a_non_vital_position(relay):
    model, batch, means, dims = relay
    ev = evaluator(model, batch, means)
    every = Circuit({g: [[lay, h] for lay in range(dims.n_layers) for h in range(dims.n_heads)] for g in task_named("entity_tracking").group_names})
    r = faithfulness(ev, every, dims, n_random=0)
    assert r["accuracy_model"] == 1.0
    assert r["all_heads"]["faithfulness"] < 0.2  # the relay head at the object position is mean-ablated
    assert r["faithfulness"] == pytest.approx(r["all_heads"]["faithfulness"])  # keeping every head there IS the all_heads
    if r["all_heads"]["faithfulness"] == 0:
        assert r["relative_to_all_heads"] is None and "reason_relative_to_all_heads" in r  # 0/0: undefined, never NaN
    else:
        assert r["relative_to_all_heads"] == pytest.approx(1.0)
    loose = faithfulness(ev, every, dims, n_random=0, ablate_non_vital=False)
    assert loose["all_heads"]["faithfulness"] == 1.0  # no position is ablated: the identity
    # the planted unit alone restores it: it is the non-vital position that matters
    two = Ablation(empty_keep(dims)).plus([("correct_object", 0, 1), ("last", 1, 2)])
    assert float(ev([two]).mean()) == 1.0


def test_all_heads_reference_without_ablating_other_positions_is_the_unpatched_model(relay):
    model, batch, means, dims = relay
    plain = last_logits(model, batch)
    assert torch.equal(run_ablations(model, batch, means, [all_heads_ablation(dims, ablate_non_vital=False)])[0], plain)


def test_search_finds_the_planted_units_from_exact_and_from_attribution_scores(relay):
    model, batch, means, dims = relay
    ev = evaluator(model, batch, means)
    shape = (len(ROLE_VOCAB), dims.n_layers, dims.n_heads)
    present = torch.zeros(len(ROLE_VOCAB), dtype=torch.bool)
    present[batch.token_roles.unique()] = True
    valid = present[:, None, None].expand(shape).flatten()
    idx = valid.nonzero()[:, 0]
    exact = torch.full((valid.numel(),), -torch.inf)
    exact[idx] = exact_removal_effects(lambda a: logp_of(model, batch, means, a), full_model(dims), idx.tolist(), shape)
    att = UnitAttribution(model, means, steps=4)
    att.on_predict_epoch_start()
    att.predict_step(batch, 0)
    ig = att.scores().flatten().masked_fill(~valid, -torch.inf)
    planted = {ROLE_ID["correct_object"] * dims.n_layers * dims.n_heads + 0 * dims.n_heads + 1,
               ROLE_ID["last"] * dims.n_layers * dims.n_heads + 1 * dims.n_heads + 2}
    for scores in (exact, ig):
        assert set(torch.argsort(scores, descending=True)[:2].tolist()) == planted

        def rank(keep, scores=scores):
            s = scores.masked_fill(keep.flatten(), -torch.inf)
            return torch.argsort(s, descending=True)[: int(torch.isfinite(s).sum())]

        keep, f, trace = grow_and_prune(ev, rank, dims, 1.0, 0.9, max_units=int(valid.sum()) // 2)
        assert f == 1.0 and set(keep.flatten().nonzero()[:, 0].tolist()) == planted
        assert trace.evaluations > 0 and trace.rounds[0]["faithfulness"] == 1.0


def test_integrated_gradients_sum_to_the_total_effect(relay):
    """Completeness of IG: the units' attributions add up to logp(full model) - logp(everything ablated)."""
    model, batch, means, dims = relay
    att = UnitAttribution(model, means, steps=32)
    att.on_predict_epoch_start()
    att.predict_step(batch, 0)
    lp = logp_of(model, batch, means, [full_model(dims), Ablation(empty_keep(dims))]).mean(1)
    total = float(lp[0] - lp[1])
    assert total > 1.0
    assert float(att.scores().sum()) == pytest.approx(total, rel=0.05)


def test_interpolation_mask_at_one_is_an_exact_no_op(relay):
    model, batch, means, dims = relay
    m = torch.ones(*batch.input_ids.shape, dims.n_layers, dims.n_heads)
    with hooked(model, patches=ablation_patches(means, m)):
        out = last_logits(model, batch)
    assert torch.equal(out, last_logits(model, batch))


def test_ranked_heads_put_unscored_heads_last():
    s = torch.tensor([[0.0, -0.5], [-0.1, 0.0]])
    scored = torch.tensor([[True, True], [False, False]])
    assert ranked_heads(s, scored) == [(0, 1), (0, 0), (1, 0), (1, 1)]


def test_curve_circuits_remove_pt_from_vf_and_end_at_the_all_heads_reference(relay):
    _, _, _, dims = relay
    g = torch.Generator().manual_seed(0)
    scores = {grp: -torch.rand(dims.n_layers, dims.n_heads, generator=g) for grp in task_named("entity_tracking").group_names}
    pts = curve_circuits(scores, None, [0.25, 0.5, 1.0])
    for _, c in pts:
        assert not set(c.groups["value_fetcher"]) & set(c.groups["pos_transmitter"])
    last = pts[-1][1]
    n = dims.n_layers * dims.n_heads
    assert {r: len(last.heads_at(r)) for r in ("last", "query_label", "prev_query_label")} == {
        "last": n, "query_label": n, "prev_query_label": n}


def test_curve_on_the_planted_model_is_monotone_and_its_last_point_is_the_all_heads_reference(tok):
    model = planted_model(tok, head=2)  # the answer rests on (1, 2) at `last`
    batch, _ = batch_of(tok, n=24, n_boxes=1, seed=3)
    ab_batch, _ = batch_of(tok, n=24, n_boxes=1, seed=4)
    means, dims = means_of(model, ab_batch), LlamaFamily(model).dims
    ev = evaluator(model, batch, means)
    vf = torch.zeros(dims.n_layers, dims.n_heads)
    vf[1, 2] = -1.0  # path patching ranks the planted head first; the others tie behind it
    scores = {"value_fetcher": vf, **{g: torch.zeros(dims.n_layers, dims.n_heads) for g in task_named("entity_tracking").group_names[1:]}}
    fracs = [0.125, 0.25, 0.5, 1.0]
    fs = [faithfulness(ev, c, dims, n_random=0)["faithfulness"] for _, c in curve_circuits(scores, None, fracs)]
    assert all(b >= a - 1e-9 for a, b in zip(fs, fs[1:]))
    reference = faithfulness(ev, Circuit({}), dims, n_random=0)["all_heads"]["faithfulness"]
    assert fs[-1] == pytest.approx(reference) and fs[0] == 1.0


def test_cpr_and_cmd_of_a_known_curve():
    # fractions 0.01, 0.1, 1 are equally spaced in log: t = 0, 0.5, 1
    r = integrated([0.01, 0.1, 1.0], [0.2, 0.6, 1.0])
    assert r["cpr"] == pytest.approx(0.5 * (0.2 + 0.6) / 2 + 0.5 * (0.6 + 1.0) / 2)  # 0.6
    assert r["cmd"] == pytest.approx(0.5 * (0.8 + 0.4) / 2 + 0.5 * (0.4 + 0.0) / 2)  # 0.4
    assert integrated([0.1, 1.0], [1.0, 1.0]) == {"cpr": 1.0, "cmd": 0.0}
    over = integrated([0.1, 1.0], [1.2, 1.2])
    assert over["cmd"] == pytest.approx(0.2)  # overshooting the model counts as distance too


SMALL = ["logger=none", "data.n_boxes=1", "ablation.n_prompts=24", "trainer.enable_progress_bar=false"]


def test_circuit_search_cli_finds_the_planted_units(tmp_path):
    res = compose_run(tmp_path, ["method=circuit_search", "model=tiny_planted", "method.n_search=24", "method.n_heldout=24",
                                 "method.exact_max_units=0", "method.n_verify=8", "method.verify_prompts=12"] + SMALL)
    circ = load_circuit(tmp_path / "circuit.json")
    assert set(circ.units()) == {("correct_object", 0, 1), ("last", 1, 2)}
    assert res.faithfulness == 1.0 and res.all_heads["faithfulness"] < 0.2
    assert res.unit_fraction == pytest.approx(2 / res.units_total)
    assert res.extra["scoring"] == "attribution" and res.extra["verification"]["units"] == 8
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["schema"] == "etk.circuit_search/v1" and (tmp_path / "circuit.png").exists()


def test_faithfulness_curve_cli_from_a_path_patching_run(tmp_path):
    compose_run(tmp_path / "pp", ["method=path_patching", "model=tiny_planted", "method.n_examples=8",
                                  "method.batch_size=8"] + SMALL)
    compose_run(tmp_path / "curve", ["method=faithfulness_curve", "model=tiny_planted",
                                           f"scores={tmp_path / 'pp'}", "method.n_examples=24", "method.n_random=1"] + SMALL)
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert [p["fraction"] for p in curve["points"]] == sorted(p["fraction"] for p in curve["points"])
    assert curve["points"][-1]["faithfulness"] == pytest.approx(curve["all_heads"]["faithfulness"])
    # CPR and CMD recomputed from the written points: trapezoids over log(fraction) rescaled to [0, 1], under the
    # faithfulness curve (CPR) and between it and 1 (CMD)
    xs = [math.log(p["fraction"]) for p in curve["points"]]
    t = [(x - xs[0]) / (xs[-1] - xs[0]) for x in xs]
    fs = [p["faithfulness"] for p in curve["points"]]
    area = lambda ys: sum((t[i + 1] - t[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(t) - 1))  # noqa: E731
    assert curve["cpr"] == pytest.approx(area(fs), abs=1e-12)
    assert curve["cmd"] == pytest.approx(area([abs(1 - f) for f in fs]), abs=1e-12)
    assert json.loads((tmp_path / "curve" / "results.json").read_text())["cpr"] == curve["cpr"]
    assert (tmp_path / "curve" / "curve.png").exists()


def test_a_lazy_growth_grid_keeps_the_same_circuit_and_skips_the_sizes_above_the_target():
    """The growth grid evaluated in ascending chunks, stopping at the first chunk reaching the target, picks the
    same circuit as the whole grid (the larger sizes decide nothing), with fewer evaluations; a grid that never
    reaches the target is evaluated whole either way."""
    from etk.models.arch import Dims

    dims = Dims(n_layers=4, n_heads=8, n_kv_heads=8, head_dim=2, d_model=16, vocab_size=10)
    shape = (len(ROLE_VOCAB), dims.n_layers, dims.n_heads)
    n_all = shape[0] * shape[1] * shape[2]
    weights = torch.linspace(1.0, 0.0, n_all)  # unit u's contribution: earlier units matter more
    order = torch.arange(n_all)

    def run(lazy: bool, target: float):
        calls = []

        def evaluate(ablations):
            calls.append(len(ablations))
            f = torch.stack([(weights * a.keep.flatten().float()).sum() / weights.sum() for a in ablations])
            return (f * 20).clamp(max=1.0)[:, None]  # [K, 1]: "correctness" grows with the kept weight

        def rank(keep):
            return order[~keep.flatten()[order]]

        keep, f, trace = grow_and_prune(evaluate, rank, dims, 1.0, target, max_units=n_all, grid_points=12,
                                        lazy_grid=lazy)
        return keep, f, trace, sum(calls)

    for target in (0.9, 2.0):  # reached early; never reached
        lazy, whole = run(True, target), run(False, target)
        assert torch.equal(lazy[0], whole[0]) and lazy[1] == whole[1]
        if target < 1:
            assert lazy[3] < whole[3]
            assert len(lazy[2].rounds[0]["tried"]) < len(whole[2].rounds[0]["tried"])
        else:
            assert lazy[2].rounds[0]["tried"] == whole[2].rounds[0]["tried"]
