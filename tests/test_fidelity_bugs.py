"""Fidelity bugs (issue 24, deliverable 1), each with a test that failed before the fix: minimality's threshold from
the model config, CMAP's empty DCM selection patching nothing (the paper's code), overlap of circuits with empty
groups, a template without {label} refused before loading, and an unreadable dequantised-model cache rebuilt."""

import json

import torch

import pytest

from etk.errors import ConfigError, EtkError
from tests.helpers import compose_cfg, compose_run


@pytest.mark.parametrize("model,overrides,expect", [
    ("goat_7b", [], (0.0, "model.discovery.minimality_threshold")),
    ("llama_7b", [], (0.01, "model.discovery.minimality_threshold")),
    ("goat_7b", ["method.threshold=0.05"], (0.05, "method.threshold")),
])
def test_minimality_takes_the_models_threshold_unless_overridden(tmp_path, model, overrides, expect):
    from etk.methods.minimality.run import minimality_threshold

    cfg = compose_cfg("patching", tmp_path, ["method=minimality", f"model={model}", *overrides])
    assert minimality_threshold(cfg) == expect


def test_minimality_records_its_threshold_and_where_it_came_from(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"value_fetcher": [[1, 0], [1, 1]], "pos_detector": [[0, 2]]}))
    compose_run(tmp_path / "run", ["method=minimality", "model=tiny", f"circuit.path={tmp_path / 'c.json'}",
                                   "logger=none", "data.n_boxes=3", "data.n_examples=12", "method.n_examples=6",
                                   "method.batch_size=6", "ablation.n_prompts=8", "trainer.enable_progress_bar=false"])
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["threshold"] == 0.0 and doc["threshold_source"] == "model.discovery.minimality_threshold"


def _selection(path, group, heads):
    from etk.artifacts import write_json

    write_json(path, {"group": group, "desideratum": "object", "heads": heads, "group_heads": [[0, 0]]},
               "etk.dcm_heads/v1")
    return path


@pytest.mark.parametrize("empty,expect_heads,expect_source", [("nothing", [], "empty_selection"),
                                                              ("circuit", [[1, 0], [1, 1]], "circuit (")])
def test_an_empty_dcm_selection_patches_nothing_unless_asked(tmp_path, empty, expect_heads, expect_source):
    from etk.circuits import Circuit
    from etk.methods.cmap.run import cmap_head_sets

    sel = _selection(tmp_path / "selected_heads.json", "value_fetcher", [])
    cfg = compose_cfg("patching", tmp_path, ["method=cmap", "pair=tiny", f"method.dcm_runs=[{sel}]",
                                             f"method.empty_selection={empty}"])
    groups, sources = cmap_head_sets(cfg, Circuit({"value_fetcher": [[1, 0], [1, 1]], "pos_detector": [[0, 2]]}))
    assert [list(h) for h in groups["value_fetcher"]] == expect_heads
    assert sources["value_fetcher"].startswith(expect_source) and sources["pos_detector"] == "circuit"


def test_cmap_with_an_empty_selection_equals_the_target_alone(tmp_path):
    sel = _selection(tmp_path / "selected_heads.json", "value_fetcher", [])
    (tmp_path / "c.json").write_text(json.dumps({"value_fetcher": [[1, 0], [1, 1]], "pos_detector": [[0, 2]]}))
    compose_run(tmp_path / "run", ["method=cmap", "pair=tiny", f"circuit.path={tmp_path / 'c.json'}", "logger=none",
                                   f"method.dcm_runs=[{sel}]", "method.groups=[value_fetcher]", "data.n_boxes=3",
                                   "method.n_examples=8", "method.batch_size=8", "trainer.enable_progress_bar=false"])
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    r = doc["results"]
    assert doc["head_sources"]["value_fetcher"] == "empty_selection"
    assert r["value_fetcher"]["heads_per_role"] == {} and r["value_fetcher"]["accuracy"] == r["target_alone"]["accuracy"]


def test_overlap_of_circuits_with_empty_groups_says_n_a(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps({"value_fetcher": [], "pos_detector": [[0, 1]]}))
    (tmp_path / "b.json").write_text(json.dumps({"value_fetcher": [[1, 1]], "pos_detector": [[0, 1]]}))
    compose_run(tmp_path / "run", ["method=overlap", f"circuit.path={tmp_path / 'a.json'}", "logger=none",
                                   f"method.other={tmp_path / 'b.json'}"])
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["overlap"]["value_fetcher"] == {"shared": 0, "size_a": 0, "size_b": 1, "precision": None, "recall": 0.0}
    assert doc["overlap"]["pos_detector"]["precision"] == 1.0
    assert "value_fetcher: shared 0 (precision n/a, recall 0.00)" in capsys.readouterr().out


def test_a_template_whose_query_lacks_the_label_is_a_config_error_before_loading(tmp_path):
    from etk.validate import validate

    cfg = compose_cfg("patching", tmp_path, ["method=eval", "model=llama_7b", "+data.template.query='Box contains the'"])
    with pytest.raises(ConfigError, match=r"data.template: .*\{label\}"):
        validate(cfg)  # llama_7b's weights are absent: a load would fail otherwise; the check comes first


def test_an_unreadable_dequantised_cache_is_rebuilt_once(tmp_path, monkeypatch, tok):
    """The first read of the cache meets a truncated safetensors file: the folder is removed and rebuilt, and the
    model loads; a cache that stays unreadable gives one paragraph naming the folder."""
    import etk.models.loading as loading
    from etk.models.tiny import tiny_llama

    good = tmp_path / "built"
    tiny_llama(len(tok), n_layers=1, d_model=32).save_pretrained(good)
    tok.save_pretrained(good)
    calls = []

    def fake_dequantised_dir(package, filename):
        target = tmp_path / "cache"
        if not target.exists():
            import shutil

            shutil.copytree(good, target)
            if not calls:  # the first cache is truncated
                data = (target / "model.safetensors").read_bytes()
                (target / "model.safetensors").write_bytes(data[: len(data) // 3])
        calls.append(target)
        return target

    monkeypatch.setattr(loading, "dequantised_dir", fake_dequantised_dir)
    cfg = {"name": "x", "source": "gguf_package", "package": "p", "gguf_file": "f", "dtype": "float32"}
    from omegaconf import OmegaConf

    model, _ = loading.load_model(OmegaConf.create(cfg))
    assert len(calls) == 2 and model.config.num_hidden_layers == 1

    def always_truncated(package, filename):
        target = tmp_path / "bad"
        target.mkdir(exist_ok=True)
        (target / "config.json").write_text((good / "config.json").read_text())
        (target / "model.safetensors").write_bytes(b"\x00" * 10)
        return target

    monkeypatch.setattr(loading, "dequantised_dir", always_truncated)
    with pytest.raises(EtkError, match="delete that folder"):
        loading.load_model(OmegaConf.create(cfg))


# -- the paper code's behaviour, one switch away ----------------------------------------------------------------------

def test_knockout_paper_compat_draws_the_random_key_per_edge_start_layer_and_prompt(tok, tiny):
    from etk.methods.knockout.module import KnockoutModule
    from etk.models.loading import LoadedModel
    from tests.helpers import batch_of

    batch, _ = batch_of(tok, n=8, n_boxes=5)
    batch.index = torch.arange(8)
    keys = {}
    for paper in (False, True):
        m = KnockoutModule({"name": "tiny"}, ["last->random", "query_label->random"], [0, 1], model=LoadedModel(tiny, tok, {}),
                           paper_compat=paper)
        m.on_predict_epoch_start = lambda: None
        m.generator = torch.Generator().manual_seed(5)
        q, k, s = m._positions(batch)  # configs: baseline, (last->random, 0), (last->random, 1), (ql->random, 0), ...
        keys[paper] = k
    shared, drawn = keys[False], keys[True]
    assert bool((shared[1] == shared[2]).all()) and bool((shared[1] == shared[3]).all())  # one draw per prompt
    assert not bool((drawn[1] == drawn[2]).all()) and not bool((drawn[1] == drawn[3]).all())  # anew per config


def test_activation_patching_paper_compat_uses_the_bug_pos_sampler(tmp_path, monkeypatch):
    from etk.tasks.entity_tracking import EntityTracking

    seen = []
    original = EntityTracking.desideratum_pairs

    def spy(self, name, bases, seed, legacy=False):
        seen.append((name, legacy))
        return original(self, name, bases, seed, legacy)

    monkeypatch.setattr(EntityTracking, "desideratum_pairs", spy)
    sel = _selection(tmp_path / "selected_heads.json", "pos_transmitter", [[1, 0]])
    doc = json.loads(sel.read_text())
    doc["desideratum"] = "positional"
    sel.write_text(json.dumps(doc))
    compose_run(tmp_path / "run", ["method=activation_patching", "model=tiny", f"method.heads={sel}", "logger=none",
                                   "data.n_boxes=3", "method.n_examples=6", "method.batch_size=6", "method.repeats=1",
                                   "method.paper_compat=true", "trainer.enable_progress_bar=false"])
    assert seen == [("positional", True)]


def test_path_patching_paper_compat_ranks_every_head_including_exact_zeros():
    """PT's senders are layer 0 only (its receiver is at layer 1): etk ranks those two heads, the paper's top-k also
    the unreachable heads' exact zeros, which then beat a positive score and become PD's receivers."""
    import torch

    from etk.methods.path_patching.discover import discover
    from etk.methods.path_patching.stages import task_stages
    from etk.models.arch import Dims
    from etk.tasks import task_named

    dims = Dims(n_layers=3, n_heads=2, n_kv_heads=2, head_dim=4, d_model=8, vocab_size=10)
    graph = task_stages(task_named("entity_tracking"))
    table = {"value_fetcher": {(1, 0): -1.0}, "pos_transmitter": {(0, 1): -1.0, (0, 0): 0.5}}

    def score(stage, rec, senders):
        s = torch.zeros(3, 2)
        for h in senders:
            s[h.layer, h.head] = table.get(stage.group, {}).get((h.layer, h.head), 1.0)
        return s, {}

    layers = {}
    for paper in (False, True):
        res = discover(graph, ["value_fetcher", "pos_transmitter", "pos_detector"], dims,
                       {"value_fetcher": 1, "pos_transmitter": 2}, score, paper)
        layers[paper] = res[2].receivers.layers  # PD's receivers: PT's top 2
    assert layers[False] == [0] and layers[True] != [0] and 0 in layers[True]


@pytest.mark.parametrize("paper,steps", [(False, [4, 10]), (True, [1, 5, 7, 11])])
def test_dcm_paper_compat_validates_after_steps_1_5_9_and_does_not_shuffle(tmp_path, paper, steps):
    """48 training pairs in batches of 8, 2 epochs of 6 steps: etk (Lightning's val_check_interval=4) scores the mask
    after the 4th batch of each epoch (steps 4, 10) and shuffles the training pairs; the paper's code after every
    batch whose index within the epoch is a multiple of 4 (steps 1, 5, 7, 11), in dataset order."""
    from etk.methods.dcm.run import dcm_loaders
    from tests.helpers import compose_cfg as compose

    overrides = ["model=tiny", "desideratum=object", "logger=none", "dcm.n_train=48", "dcm.n_eval=8", "dcm.n_test=8",
                 "dcm.batch_size=8", "dcm.epochs=2", "data.n_boxes=3", "trainer.enable_progress_bar=false",
                 f"dcm.paper_compat={str(paper).lower()}"]
    from etk.methods.dcm.run import run_dcm

    cfg = compose("dcm", tmp_path, overrides)
    run_dcm(cfg)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["validated_after_steps"] == steps
    from etk.models.tiny import tiny_tokenizer

    first = next(iter(dcm_loaders(cfg, tiny_tokenizer())[0]))
    assert (first.base.index.tolist() == list(range(8))) == paper


def test_circuit_algebra_on_the_papers_circuits():
    """Goat ∩ Llama per group is the paper's overlap 27/6/16/5; Goat − Llama holds the heads Goat adds; the union
    has every head once; the three are consistent set operations per group."""
    from etk.circuits import load_circuit

    llama, goat = load_circuit("llama_7b"), load_circuit("goat_7b")
    shared, added = goat.intersect(llama), goat.minus(llama)
    assert {g: len(h) for g, h in shared.groups.items()} == {"value_fetcher": 27, "pos_transmitter": 6,
                                                              "pos_detector": 16, "struct_reader": 5}
    assert {g: len(h) for g, h in added.groups.items()} == {"value_fetcher": 41, "pos_transmitter": 22,
                                                             "pos_detector": 24, "struct_reader": 34}
    both = goat.union(llama)
    for g in goat.groups:
        assert set(both.groups[g]) == set(goat.groups[g]) | set(llama.groups[g])
        assert len(both.groups[g]) == len(set(both.groups[g]))
        assert set(shared.groups[g]) | set(added.groups[g]) == set(goat.groups[g])
        assert shared.groups[g] == [h for h in goat.groups[g] if h in set(llama.groups[g])]  # Goat's order kept


def test_activation_patching_reads_the_papers_txt_head_sets(tmp_path):
    """D7: a head set in the paper's DCM output format (`<circuit>__<group>__<desideratum>__<lambda>.txt`, as shipped
    in etk/data/dcm and read by CMAP) is accepted by activation patching, group and desideratum from its name."""
    txt = tmp_path / "tiny_circuit__pos_transmitter__positional__0.01.txt"
    txt.write_text("Heads: [[1, 0], [0, 2]]\nTest Accuracy: 0.5\n")
    compose_run(tmp_path / "run", ["method=activation_patching", "model=tiny", f"method.heads={txt}", "logger=none",
                                   "data.n_boxes=3", "method.n_examples=6", "method.batch_size=6", "method.repeats=1",
                                   "trainer.enable_progress_bar=false"])
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["group"] == "pos_transmitter" and doc["desideratum"] == "positional" and doc["heads"] == [[1, 0], [0, 2]]


def test_minimality_paper_compat_ranks_the_papers_stored_pairs_with_bug_is():
    """Hand-built pair accuracies: the partner whose joint removal kills the circuit (0) tops v's ranking in etk
    and is absent from the paper's; the partner with v's head index in another layer gets acc(C \\ v) as its pair
    accuracy under [BUG-is]."""
    from etk.data.roles import ROLE_ID
    from etk.methods.mean_ablation.ablation import Ablation
    from etk.methods.minimality.minimality import _ranking_batched, ranking_ablations

    items = [("last", 0, 1), ("last", 1, 2), ("last", 2, 1)]  # heads 0 and 2 share head index 1
    acc = {frozenset([0]): 0.8, frozenset([1]): 0.7, frozenset([2]): 0.6,
           frozenset([0, 1]): 0.0, frozenset([0, 2]): 0.5, frozenset([1, 2]): 0.4}
    circ = Ablation(torch.ones(len(ROLE_ID), 3, 3, dtype=torch.bool))

    def evaluate(ablations):  # [K, 1] accuracy of each ablation, read from which items it removes
        return torch.tensor([[acc[frozenset(i for i, (role, layer, head) in enumerate(items)
                                            if not bool(a.keep[ROLE_ID[role], layer, head]))]] for a in ablations])

    pair_acc = evaluate(ranking_ablations(circ, items, "batched")).mean(1)
    etk = _ranking_batched(pair_acc, items)
    paper = _ranking_batched(pair_acc, items, paper_compat=True)
    # v = 0: etk ranks u = 1 first (r = acc(C\\1) - acc(C\\{0,1}) = 0.7 - 0 = 0.7), then u = 2 (0.6 - 0.5); the paper
    # never stored pair {0, 1}, and u = 2 shares v's head index: its pair accuracy is acc(C\\0) = 0.8, r = -0.2
    assert etk[0] == [(1, pytest.approx(0.7)), (2, pytest.approx(0.1))]
    assert paper[0] == [(2, pytest.approx(-0.2))]
    # v = 1 (head index 2, no namesake): the pair {0, 1} (accuracy 0) is dropped, the pair {1, 2} kept as is
    assert etk[1] == [(0, pytest.approx(0.8)), (2, pytest.approx(0.2))] and paper[1] == [(2, pytest.approx(0.2))]


def test_unchanged_is_said_only_where_the_interval_rules_out_a_change_that_matters():
    """The issue's case: VF object value 0.667 (n = 42) vs 0.531 (n = 64) overlap but cannot rule out a large change."""
    from etk.metrics import accuracy_ci
    from etk.report.findings import no_difference_text

    vague = no_difference_text(accuracy_ci(k=28, n=42), accuracy_ci(k=34, n=64))
    assert vague.startswith("not distinguishable at this sample size (n = 42 / 64") and "about 0.27" in vague
    assert no_difference_text(accuracy_ci(k=5000, n=10000), accuracy_ci(k=5010, n=10000)).startswith("unchanged")


def test_path_patching_paper_compat_draws_the_sr_label_per_sender_and_fast_equals_naive(tok):
    """D1: with the switch each (prompt, sender) reads the corrupt z at its own drawn box label (they differ across
    senders; the same prompt draws the same in any batch), and the fast algorithm still equals the definition."""
    from etk.interventions.components import all_heads
    from etk.methods.path_patching.fast import fast_scores
    from etk.methods.path_patching.naive import naive_scores
    from etk.methods.path_patching.stages import reachable_layers, receivers_from, sender_draws, task_stages
    from etk.models.arch import LlamaFamily
    from etk.models.tiny import tiny_llama
    from etk.tasks import task_named
    from tests.helpers import RECV, pp_batch

    model = tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=11)
    dims = LlamaFamily(model).dims
    batch = pp_batch(tok, n=6, n_boxes=4)
    assert batch.clean.index.tolist() == list(range(6))  # the loader stamps dataset indices: the draws' keys
    stages = task_stages(task_named("entity_tracking"))
    st = stages["struct_reader"]
    draws = sender_draws(batch, st, dims.n_layers, dims.n_heads, 20)
    assert draws.shape == (6, 4, 4) and all(len(set(d.flatten().tolist())) > 1 for d in draws)  # differ by sender
    assert int(draws.max()) < 4 and int(draws.min()) >= 0
    again = pp_batch(tok, n=6, n_boxes=4)  # the same prompts at the same dataset indices, another batch: same draws
    assert torch.equal(sender_draws(again, st, dims.n_layers, dims.n_heads, 20), draws)
    assert sender_draws(batch, stages["pos_detector"], dims.n_layers, dims.n_heads, 20) is None  # only SR draws
    rec = receivers_from(RECV[:2], st.receiver_site, dims)
    reach = [h for h in all_heads(dims) if h.layer in reachable_layers(st, rec, dims.n_layers)]
    naive = naive_scores(model, batch, st, rec, reach, draws=draws)[0]
    fast = fast_scores(model, batch, st, rec, reach, draws=draws)[0]
    shared = fast_scores(model, batch, st, rec, reach)[0]
    assert naive.abs().max() > 0 and not torch.allclose(fast, shared)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-4)


def test_causal_impact_on_hand_made_score_maps(tmp_path):
    """Two members' score maps written by hand: each fine-tuned head's two scores, shared vs added, the group means."""
    from etk.circuits import save_score_map

    for member, vf in (("ft", [[-0.5, 0.0], [-0.2, -0.1]]), ("base", [[-0.3, 0.0], [0.1, -0.4]])):
        for g in ("value_fetcher", "pos_transmitter", "pos_detector", "struct_reader"):
            save_score_map(tmp_path / member / "scores" / f"{g}.json", torch.tensor(vf) * (1 if g == "value_fetcher" else 0))
    (tmp_path / "ft.json").write_text(json.dumps({"value_fetcher": [[0, 0], [1, 0], [1, 1]]}))
    (tmp_path / "base.json").write_text(json.dumps({"value_fetcher": [[0, 0], [1, 1], [0, 1]]}))
    compose_run(tmp_path / "run", ["method=causal_impact", "logger=none", f"circuit.path={tmp_path / 'ft.json'}",
                                   f"method.base_circuit={tmp_path / 'base.json'}",
                                   f"method.finetuned_scores={tmp_path / 'ft'}", f"method.base_scores={tmp_path / 'base'}"])
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {tuple(r["head"]): (r["finetuned_score"], r["base_score"], r["shared"]) for r in doc["heads"]}
    assert rows == {(0, 0): (pytest.approx(-0.5), pytest.approx(-0.3), True),
                    (1, 0): (pytest.approx(-0.2), pytest.approx(0.1), False),
                    (1, 1): (pytest.approx(-0.1), pytest.approx(-0.4), True)}
    vf = doc["groups"]["value_fetcher"]
    assert vf["shared"]["n"] == 2 and vf["shared"]["finetuned_mean"] == pytest.approx(-0.3)
    assert vf["shared"]["base_mean"] == pytest.approx(-0.35)
    assert vf["added"] == {"n": 1, "finetuned_mean": pytest.approx(-0.2), "base_mean": pytest.approx(0.1)}
    assert (tmp_path / "run" / "causal_impact.png").exists()


def test_cmap_on_no_prompts_is_a_data_error_not_a_division_by_zero(tmp_path, monkeypatch):
    """Reachable from the Python API with an empty prompt set: a one-paragraph DataError, and the accuracy helper
    itself gives None on no prompts."""
    import torch

    from etk.errors import DataError
    from etk.metrics import accuracy_ci
    from etk.tasks.entity_tracking import EntityTracking

    assert accuracy_ci(torch.zeros(0)) == {"accuracy": None, "ci_low": None, "ci_high": None, "n": 0}
    monkeypatch.setattr(EntityTracking, "examples", lambda self, data_cfg, tokenizer: [])
    with pytest.raises(DataError, match="no prompt"):
        compose_run(tmp_path, ["method=cmap", "pair=tiny_self", "data.n_boxes=3", "logger=none",
                               "trainer.enable_progress_bar=false"])
