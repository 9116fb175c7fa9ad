"""Issue 25: the frozen model stays where it is across Lightning loops, and every exact saving equals its reference
mode (`reference=true`, the earlier code path) on tiny models: knockout from the blocked query on, the joint DCM fit,
activation patching in one loop with shared sources, the active-token mean-ablation path, and path patching reading
the stage's clean forward. Plus the settings that size memory (`cache_mb: auto`, `reuse_models: auto`), the dtype
rule and the study's job order and progress lines."""

import json

import lightning as L
import pytest
import torch

from etk.models.tiny import tiny_llama
from tests.helpers import batch_of, compose_run

SMALL_STUDY = ["method=study", "pair=tiny", "pair.base.tiny.n_layers=3", "pair.finetuned.tiny.n_layers=3",
               "data.n_boxes=3", "data.n_examples=20", "logger=none", "method.eval.box_counts=[3]",
               "method.path_patching.n_examples=6", "method.path_patching.batch_size=6", "method.minimality.n_examples=6",
               "method.minimality.batch_size=6", "method.circuit_search.n_search=6", "method.circuit_search.n_heldout=6",
               "method.ablation_prompts=8", "method.plan.dcm_groups=[value_fetcher,pos_transmitter]",
               "method.plan.dcm_desiderata=[object]", "method.plan.split=false", "method.dcm.n_train=16",
               "method.dcm.n_eval=8", "method.dcm.n_test=8", "method.dcm.batch_size=8",
               "method.activation_patching.n_examples=8", "method.activation_patching.repeats=2",
               "method.cmap.n_examples=8", "method.knockout.n_examples=4", "method.knockout.batch_size=4",
               "method.steps=[eval,path_patching,minimality,circuit_search,dcm,activation_patching,cmap,knockout]"]


def count_moves(net) -> list[int]:
    """Count the calls that move (or cast) `net`'s parameters: `.to/.cpu/.cuda` of it or of a module holding it
    all go through `Module._apply`."""
    n = [0]
    inner = net._apply

    def _apply(fn, *args, **kwargs):
        n[0] += 1
        return inner(fn, *args, **kwargs)

    net._apply = _apply
    return n


# (1) device ----------------------------------------------------------------------------------------------------

def test_the_counter_sees_lightnings_teardown_move_a_registered_model(tok):
    """The instrument of the next test can fail: a model registered as a submodule is moved by every loop's
    teardown (`lightning_module.cpu()`), as etk's frozen models were before."""
    net = tiny_llama(len(tok), n_layers=1)
    moves = count_moves(net)

    class Registered(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def predict_step(self, batch, batch_idx):
            return None

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(Registered(), torch.utils.data.DataLoader([torch.zeros(1)]), return_predictions=False)
    assert moves[0] >= 1


def test_frozen_models_are_never_moved_across_a_studys_loops(tmp_path, monkeypatch):
    """Every model a study loads, counted from its load on: eval, path patching, minimality, circuit search (with
    its attribution module), DCM (fit, validation, test), activation patching, CMAP (a pair) and knockout run ~40
    Lightning loops on them, and none moves a model (it is loaded where the run computes)."""
    import etk.models.loading as loading

    counters, load = [], loading.load_model

    def counted_load(cfg, device=None):
        net, tok = load(cfg, device)
        counters.append((cfg.get("name"), count_moves(net)))
        return net, tok

    monkeypatch.setattr(loading, "load_model", counted_load)
    compose_run(tmp_path, SMALL_STUDY)
    assert len(counters) >= 2  # both members (and the pair check's copies)
    assert {name: n[0] for name, n in counters if n[0]} == {}


# (2) exact savings ------------------------------------------------------------------------------------------------

ARCHS = ["llama", "qwen2", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_knockout_from_the_blocked_query_equals_recomputing_every_position(tok, arch, side):
    """Every (edge, start layer) of the task's edges: the logits of the suffix-only run (positions >= the
    earliest blocked query, on the clean prefix K/V) equal those of the full recompute from the start layer."""
    from etk.methods.knockout.module import KnockoutModule
    from etk.models.arch import LlamaFamily
    from etk.models.forward import output_cache
    from etk.models.loading import LoadedModel
    from etk.models.partial import LayerInputs

    net = tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=5, arch=arch)
    batch, _ = batch_of(tok, n=6, n_boxes=4, padding_side=side)
    edges = ["last->correct_object", "last->random", "query_label->prev_query_label", "query_label->random"]
    m = KnockoutModule({}, edges, model=LoadedModel(net, tok, {}))
    m.on_predict_epoch_start()
    q, k, s = m._positions(batch)
    arch_ = LlamaFamily.of(net)
    with LayerInputs(arch_, None, range(4)) as h:
        cache = output_cache(arch_.base.model(**batch.model_inputs(), use_cache=True))
    for start in range(4):
        for role in ("last", "query_label"):
            it = torch.tensor([i for i, (e, st) in enumerate(m.configs()) if st == start and e.startswith(role + "->")])
            fast = m.knocked_logits(batch, q[it], k[it], s[it], start, h[start], cache)
            full = m.knocked_logits(batch, q[it], k[it], s[it], start, h[start], None)
            torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(fast, last_of(net, batch).repeat(len(it), 1), atol=1e-6) or start == 3
    # and the predict step's correctness table is the reference module's
    ref = KnockoutModule({}, edges, model=LoadedModel(net, tok, {}), reference=True)
    ref.on_predict_epoch_start()
    m.on_predict_epoch_start()
    assert torch.equal(m.predict_step(batch, 0), ref.predict_step(batch, 0))


def last_of(net, batch):
    from etk.models.forward import last_logits

    return last_logits(net, batch)


def test_dcm_joint_fit_equals_one_fit_per_mask(tmp_path):
    """Two masks (VF and PT) fit jointly: each mask's values, selection, best validation score and test accuracy
    equal its solo reference fit's (Adam is per parameter), and the validations that repeat a binary mask are not
    run again."""
    from tests.helpers import compose_cfg

    from etk.methods.dcm.run import run_dcm, run_dcm_batch
    from etk.runtime import step_output

    common = ["model=tiny_planted", "data.n_boxes=2", "dcm.n_train=48", "dcm.n_eval=16", "dcm.n_test=16",
              "dcm.batch_size=8", "dcm.epochs=3", "dcm.val_every=2", "logger=none", "trainer.enable_progress_bar=false",
              "circuit=tiny_fixture"]
    groups = ["value_fetcher", "pos_transmitter"]
    solo = []
    for g in groups:
        cfg = compose_cfg("dcm", tmp_path / f"ref-{g}", common + [f"group={g}", "dcm.reference=true"])
        with step_output(tmp_path / f"ref-{g}"):
            solo.append(run_dcm(cfg))
    jobs = [(compose_cfg("dcm", tmp_path / f"joint-{g}", common + [f"group={g}"]), tmp_path / f"joint-{g}") for g in groups]
    joint = run_dcm_batch(jobs)
    for a, b in zip(solo, joint):
        torch.testing.assert_close(torch.tensor(b.mask_raw), torch.tensor(a.mask_raw), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(b.extra["mask_last_step"]), torch.tensor(a.extra["mask_last_step"]),
                                   rtol=0, atol=1e-5)
        assert b.selected_heads == a.selected_heads
        assert b.test == a.test and b.chance_floor_unpatched == a.chance_floor_unpatched
        assert b.best_val_accuracy == pytest.approx(a.best_val_accuracy, abs=1e-7)
        assert b.extra["validated_after_steps"] == a.extra["validated_after_steps"]
    assert [1, 2] in joint[0].selected_heads  # the planted head: the masks did move
    record = json.loads((tmp_path / "joint-value_fetcher" / "results.json").read_text())
    assert record["jointly_fit_with"] == 1
    assert record["validations_run"] < 2 * len(record["validated_after_steps"])  # repeated binary masks: memo
    assert (tmp_path / "joint-pos_transmitter" / "mask.pt").exists()
    from etk.methods.dcm.module import DCMModule  # each job's checkpoint loads as a one-mask module

    again = DCMModule.load_from_checkpoint(tmp_path / "joint-pos_transmitter" / "checkpoints" / "best.ckpt")
    assert again.hparams.group == "pos_transmitter"
    assert torch.equal(again.mask.values.detach(), torch.tensor(joint[1].mask_raw))


def test_activation_patching_in_one_loop_equals_a_loop_per_repeat_and_job(tmp_path):
    """Two DCM head sets of one desideratum, 3 repeats: the batched pass (one loop, repeats as loaders, one source
    capture for both sets) gives each job the per-repeat accuracies of its reference run."""
    from tests.helpers import compose_cfg

    from etk.methods.activation_patching.run import batch_key, run_activation_patching, run_activation_patching_batch
    from etk.runtime import step_output

    sel = []
    for i, heads in enumerate(([[1, 0], [2, 3]], [[0, 1]])):
        f = tmp_path / f"sel{i}.json"
        f.write_text(json.dumps({"schema": "etk.dcm_heads/v1", "group": "value_fetcher", "desideratum": "object_value",
                                 "heads": heads, "group_heads": heads}))
        sel.append(f)
    common = ["method=activation_patching", "model=tiny", "model.tiny.n_layers=3", "data.n_boxes=3",
              "method.n_examples=10", "method.batch_size=4", "method.repeats=3", "logger=none",
              "trainer.enable_progress_bar=false"]
    refs = []
    for i, f in enumerate(sel):
        cfg = compose_cfg("patching", tmp_path / f"ref{i}", common + [f"method.heads={f}", "method.reference=true"])
        assert batch_key(cfg) is None
        with step_output(tmp_path / f"ref{i}"):
            refs.append(run_activation_patching(cfg))
    cfgs = [compose_cfg("patching", tmp_path / f"b{i}", common + [f"method.heads={f}"]) for i, f in enumerate(sel)]
    assert batch_key(cfgs[0]) == batch_key(cfgs[1]) is not None
    got = run_activation_patching_batch([(c, tmp_path / f"b{i}") for i, c in enumerate(cfgs)])
    for a, b in zip(refs, got):
        assert b.accuracy_percent == a.accuracy_percent
        assert b.random_heads == a.random_heads and b.heads == a.heads


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_the_active_token_path_equals_full_forwards(tok, n_kv_heads):
    """Ablations keeping units at any roles and layers (none; one role; late layers only, so tokens start deep; `last`
    at the top layer only; many roles): recomputing each token from its first kept layer on the all-ablated
    background gives the full mean-ablated forward's logits, with padding on either side; and it runs fewer blocks
    than a full forward."""
    from etk.data.roles import ROLE_ID
    from etk.methods.mean_ablation.ablation import Ablation, empty_keep
    from etk.methods.mean_ablation.vital import active_logits, background, staggered_blocks, start_layers
    from etk.models.arch import LlamaFamily
    from tests.helpers import means_of, run_ablations

    net = tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=n_kv_heads, seed=9)
    dims = LlamaFamily(net).dims
    L = dims.n_layers
    for side in ("right", "left"):
        batch, _ = batch_of(tok, n=6, n_boxes=3, padding_side=side)
        means = means_of(net, batch)
        present = sorted({int(r) for r in batch.token_roles.flatten().tolist() if r >= 0})
        plans = [[], [(present[0], 0)], [(present[1], 2), (present[2], 3)], [(ROLE_ID["last"], L - 1)],
                 [(r, (r % (L - 1)) + 1) for r in present], [(ROLE_ID["last"], 1), (present[2], 0)]]
        ablations = []
        for i, plan in enumerate(plans):
            keep = empty_keep(dims)
            for r, layer in plan:
                keep[r, layer, (i + r) % dims.n_heads] = True
                keep[r, L - 1, (i + 2 * r) % dims.n_heads] = True
            ablations.append(Ablation(keep, f"a{i}", ("last",)))
        st = start_layers(ablations, batch, L)
        assert int(staggered_blocks(st, L).sum()) < len(ablations) * batch.input_ids.numel() * L  # it does skip
        fast = active_logits(net, batch, means, ablations, background(net, batch, means))
        full = run_ablations(net, batch, means, ablations).flatten(0, 1)
        torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-4)
        one = active_logits(net, batch, means, ablations[4:5], background(net, batch, means))
        torch.testing.assert_close(one, full[4 * len(batch):5 * len(batch)], rtol=1e-4, atol=1e-4)


def test_the_shortcut_paths_are_chosen_by_their_blocks_and_give_the_full_forwards_accuracies(tok):
    """AblationEval sends ablations whose staggered blocks are at most ACTIVE_SHARE of a full forward to the active
    path (cheap: few roles, or deep start layers), ablations removing units late in the prompt from the whole model to
    the clean-prefix path, and the others to full forwards; per-example correctness and log-probabilities equal the
    reference (full forwards only)."""
    from etk.methods.mean_ablation.ablation import Ablation, empty_keep, full_model
    from etk.methods.mean_ablation.module import AblationEval
    from etk.models.arch import LlamaFamily
    from etk.models.loading import LoadedModel
    from tests.helpers import means_of

    net = tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=9)
    dims = LlamaFamily(net).dims
    batch, _ = batch_of(tok, n=6, n_boxes=3, padding_side="right")
    means = means_of(net, batch)
    present = sorted({int(r) for r in batch.token_roles.flatten().tolist() if r >= 0})
    cheap, dear = empty_keep(dims), empty_keep(dims)
    cheap[present[:2], 3, 1] = True  # two roles, top layer only
    dear[present, 0, 0] = True  # every role from layer 0
    abls = [Ablation(cheap, "cheap", ("last",)), Ablation(dear, "dear", ("last",))]
    ev = AblationEval({}, means, model=LoadedModel(net, tok, {}))
    last_only = full_model(dims).without([("last", 3, 2), ("last", 1, 0)], "M-K")  # the whole model but 2 units at `last`
    ev.ablations = abls + [last_only, full_model(dims)]
    groups, prefixed, rest = ev.active_groups([0, 1, 2, 3], batch)
    assert groups == [[0]] and prefixed == [2, 3] and rest == [1]
    out = {}
    for active in (False, True):
        m = AblationEval({}, means, model=LoadedModel(net, tok, {}), active_fast_path=active)
        m.ablations = ev.ablations
        m.on_predict_epoch_start()
        m.predict_step(batch, 0)
        out[active] = (m.acc.per_example(), m.acc.per_example_logp(), m.active_forwards, m.prefix_forwards, m.forwards)
    assert out[True][2] == 1 and out[True][3] == 1 and out[False][2:4] == (0, 0)
    assert torch.equal(out[True][0], out[False][0])
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-4)
    assert not torch.equal(out[True][1][2], out[True][1][3])  # ablating the two units at `last` does change it


@pytest.mark.parametrize("group", ["pos_transmitter", "struct_reader"])
def test_path_patching_reading_the_stages_clean_forward_equals_running_it_again(tok, group):
    from etk.interventions.components import all_heads
    from etk.methods.path_patching.fast import fast_scores
    from etk.methods.path_patching.stages import reachable_layers, receivers_from, task_stages
    from etk.models.arch import LlamaFamily
    from etk.tasks import task_named
    from tests.helpers import RECV, assert_scores_close, pp_batch

    net = tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=7)
    batch = pp_batch(tok, n=6, n_boxes=3, side="left")
    dims = LlamaFamily(net).dims
    st = task_stages(task_named("entity_tracking"))[group]
    rec = receivers_from(RECV[:2], st.receiver_site, dims)
    reach = [h for h in all_heads(dims) if h.layer in reachable_layers(st, rec, dims.n_layers)]
    fast, cost = fast_scores(net, batch, st, rec, reach)
    ref, ref_cost = fast_scores(net, batch, st, rec, reach, reuse_clean=False)
    assert_scores_close(fast, ref)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-7)
    assert cost["token_layer_blocks"] < ref_cost["token_layer_blocks"]


def test_path_patching_stages_sharing_one_clean_and_one_corrupt_forward_equal_their_own_forwards(tok):
    """`StageRuns`: the four stages read one clean and one corrupt forward per batch (the full clean run kept, or,
    with no memory for it, run again per receiver stage): bit-identical scores to each stage's own two forwards,
    with the paper's per-sender draws too; and fewer forwards."""
    from etk.interventions.components import all_heads
    from etk.methods.path_patching.fast import StageRuns, fast_scores
    from etk.methods.path_patching.stages import reachable_layers, receivers_from, sender_draws, task_stages
    from etk.models.arch import LlamaFamily
    from etk.tasks import task_named
    from tests.helpers import RECV, pp_batch

    net = tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=7)
    batch = pp_batch(tok, n=6, n_boxes=3, side="left")
    dims = LlamaFamily(net).dims
    graph = task_stages(task_named("entity_tracking"))
    for max_mb, draws_seed in (("auto", None), (0, None), ("auto", 3)):
        runs = StageRuns(list(graph.values()), max_mb)
        forwards = 0
        for group, st in graph.items():
            rec = None if st.receiver_site is None else receivers_from(RECV[:2], st.receiver_site, dims)
            reach = [h for h in all_heads(dims) if h.layer in reachable_layers(st, rec, dims.n_layers)]
            draws = None if draws_seed is None else sender_draws(batch, st, dims.n_layers, dims.n_heads, draws_seed)
            own, own_cost = fast_scores(net, batch, st, rec, reach, draws=draws, top_last_only=False)
            shared, cost = fast_scores(net, batch, st, rec, reach, draws=draws, runs=runs, top_last_only=False)
            assert torch.equal(own, shared), (group, max_mb)
            assert own_cost["forwards"] == 2 and cost["forwards"] == (2 if group == "value_fetcher" else
                                                                      0 if max_mb == "auto" else 1)
            forwards += cost["forwards"]
        assert forwards == (2 if max_mb == "auto" else 5) and len(runs.batches) == 1


@pytest.mark.parametrize("group", ["pos_detector", "struct_reader"])
def test_path_patching_top_layer_for_last_only_equals_the_whole_layer(tok, group):
    """At the top layer only `last` goes through the MLP (the other suffix tokens run attention only): the same
    scores as the whole layer at every token, with fewer blocks."""
    from etk.interventions.components import all_heads
    from etk.methods.path_patching.fast import fast_scores
    from etk.methods.path_patching.stages import reachable_layers, receivers_from, task_stages
    from etk.models.arch import LlamaFamily
    from etk.tasks import task_named
    from tests.helpers import assert_scores_close, pp_batch

    net = tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=7)
    batch = pp_batch(tok, n=6, n_boxes=3, side="right")
    dims = LlamaFamily(net).dims
    st = task_stages(task_named("entity_tracking"))[group]
    rec = receivers_from([(1, 0), (3, 2)], st.receiver_site, dims)  # a receiver in the top layer too
    reach = [h for h in all_heads(dims) if h.layer in reachable_layers(st, rec, dims.n_layers)]
    trimmed, cost = fast_scores(net, batch, st, rec, reach)
    whole, whole_cost = fast_scores(net, batch, st, rec, reach, top_last_only=False)
    assert_scores_close(trimmed, whole)
    torch.testing.assert_close(trimmed, whole, rtol=1e-5, atol=1e-7)
    assert cost["top_layer_attention_only_tokens"] > 0
    assert cost["token_layer_blocks"] + cost["top_layer_attention_only_tokens"] == whole_cost["token_layer_blocks"]


# (3) sizing, dtype, order, progress ----------------------------------------------------------------------------

def test_cache_auto_is_sized_from_free_memory_and_numbers_are_off_by_nothing(tok):
    from etk.interventions.prefix import RowCache, cache_budget
    from etk.models.loading import free_memory_bytes

    cache = RowCache(cache_budget("auto"))
    assert cache.max_bytes is None
    rows = [{"x": torch.ones(3)}]
    got = cache.get("s", torch.tensor([0]), lambda: rows)
    assert got is rows and cache.max_bytes == pytest.approx(0.25 * free_memory_bytes("cpu"), rel=0.2)
    assert cache.get("s", torch.tensor([0]), lambda: [{"x": torch.zeros(3)}])[0] is rows[0]  # a hit
    from etk.errors import ConfigError

    with pytest.raises(ConfigError, match="cache_mb"):
        cache_budget("lots")


def test_reuse_models_auto_keeps_both_members_when_they_fit(tmp_path, monkeypatch):
    import etk.models.loading as loading

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000,
                                               "intermediate_size": 11008, "num_attention_heads": 32}))
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "x", "source": "local", "path": str(d), "dtype": "float32"})
    size = loading.model_bytes(cfg)
    assert size == pytest.approx(6.74e9 * 4, rel=0.01)  # Llama-7B in fp32
    monkeypatch.setattr(loading, "free_memory_bytes", lambda device: 80e9)  # an 80 GB GPU
    assert loading.model_slots("auto", [cfg, cfg], "cpu") == 2
    monkeypatch.setattr(loading, "free_memory_bytes", lambda device: 40e9)
    assert loading.model_slots("auto", [cfg, cfg], "cpu") == 1
    assert loading.model_slots(0, [cfg, cfg], "cpu") == 0
    assert loading.model_slots("auto", [OmegaConf.create({"name": "t", "source": "tiny"})] * 2, "cpu") == 2


def test_auto_dtype_is_fp32_and_precision_is_checked():
    from omegaconf import OmegaConf

    from etk.errors import ConfigError
    from etk.models.loading import resolve_dtype
    from etk.runtime import matmul_precision

    assert resolve_dtype("auto") == torch.float32
    assert matmul_precision(OmegaConf.create({"model": {"matmul_precision": "high"}})) == "high"
    assert matmul_precision(OmegaConf.create({"pair": {"base": {}, "finetuned": {"matmul_precision": "high"}}})) == "high"
    assert matmul_precision(OmegaConf.create({"model": {}})) == "highest"
    with pytest.raises(ConfigError, match="matmul_precision"):
        matmul_precision(OmegaConf.create({"model": {"matmul_precision": "tf32"}}))


def test_jobs_run_grouped_by_member_starting_with_the_last_one():
    from etk.results import Job
    from etk.study.progress import member_order

    jobs = [Job("s", "a", member="base"), Job("s", "b", member="finetuned"), Job("s", "c", member=None),
            Job("s", "d", member="base"), Job("s", "e", member="llama_7b"), Job("s", "f", member="finetuned")]
    assert [jobs[i].name for i in member_order(jobs, None)] == ["a", "d", "c", "b", "f", "e"]
    assert [jobs[i].name for i in member_order(jobs, "finetuned")] == ["b", "f", "c", "a", "d", "e"]


def test_the_study_prints_one_line_per_job_and_no_lightning_banner(tmp_path, capfd):
    out = compose_run(tmp_path, SMALL_STUDY[:-1] + ["method.steps=[eval,path_patching]"])
    printed = capfd.readouterr()
    lines = [x for x in printed.out.splitlines() if x.startswith("[etk] [step ")]
    assert len(lines) == 4, printed.out  # two jobs per step
    assert lines[0].startswith("[etk] [step 1/2 eval 1/2] base: ") and "elapsed" in lines[0] and "left ≈" in lines[0]
    # the second step starts with the member the first ended on (a study keeping one model loaded does not reload)
    assert lines[1].startswith("[etk] [step 1/2 eval 2/2] finetuned: ")
    assert lines[2].startswith("[etk] [step 2/2 path_patching 1/2] finetuned: ")
    assert lines[3].startswith("[etk] [step 2/2 path_patching 2/2] base: ")
    for noise in ("GPU available", "TPU available", "💡 Tip", "Predicting", "Loading weights", "custom batch sampler"):
        assert noise not in printed.out + printed.err
    # what a method prints goes to its job's job.log
    assert "accuracy=" not in printed.out and "accuracy=" in (tmp_path / "eval" / "base" / "job.log").read_text()
    assert "device cpu, dtype float32, matmul highest" in printed.out
    assert out["log"][-1].startswith("total compute time")


def test_heads_near_a_top_k_cut_are_found_and_rescored_in_fp32(tmp_path):
    """`near_boundary` picks the heads around each cut; a run under matmul_precision=high re-scores them in exact
    fp32 and lists them, and its candidates are the fp32 run's."""
    from etk.methods.path_patching.run import near_boundary

    s = torch.tensor([[-1.0, -0.50, -0.49], [-0.10, 0.0, 0.3]])
    assert sorted(near_boundary(s, [2], 0.02)) == [(0, 1), (0, 2)]  # the 2nd and 3rd straddle the cut
    assert near_boundary(s, [None], 0.02) == []
    runs = {}
    for prec in ("highest", "high"):
        compose_run(tmp_path / prec, ["method=path_patching", "model=tiny", "model.tiny.n_layers=3", "data.n_boxes=3",
                                      "method.n_examples=6", "method.batch_size=6", "logger=none",
                                      f"model.matmul_precision={prec}", "method.rescore_margin=0.5"])
        runs[prec] = json.loads((tmp_path / prec / "results.json").read_text())
    assert runs["high"]["circuit"] == runs["highest"]["circuit"]
    assert any(st.get("rescored_in_fp32") for st in runs["high"]["stages"].values())
    assert not any("rescored_in_fp32" in st for st in runs["highest"]["stages"].values())


def test_the_evaluator_groups_ablations_for_the_active_path_and_equals_full_forwards(tok):
    """AblationEval with and without the active-token path: the same correctness and answer log-probabilities for
    ablations keeping units at other roles (grouped by their staggered cost; the whole model runs full forwards)."""
    from etk.methods.mean_ablation.ablation import Ablation, empty_keep, full_model
    from etk.methods.mean_ablation.module import AblationEval
    from etk.models.arch import LlamaFamily
    from etk.models.loading import LoadedModel
    from tests.helpers import means_of

    net = tiny_llama(len(tok), n_layers=3, n_heads=4, n_kv_heads=2, seed=4)
    dims = LlamaFamily(net).dims
    batch, _ = batch_of(tok, n=6, n_boxes=3)
    means = means_of(net, batch)
    present = sorted({int(r) for r in batch.token_roles.flatten().tolist() if r >= 0})
    ablations = [full_model(dims)]
    for i in range(6):
        keep = empty_keep(dims)
        keep[present[i % len(present)], i % 3, i % 4] = True
        keep[present[0], 2, 1] = True
        ablations.append(Ablation(keep, f"a{i}", ("last",)))
    out = {}
    for active in (False, True):
        m = AblationEval({}, means, model=LoadedModel(net, tok, {}), active_fast_path=active)
        m.ablations = ablations
        m.on_predict_epoch_start()
        m.predict_step(batch, 0)
        out[active] = (m.acc.per_example(), m.acc.per_example_logp(), m.active_forwards)
    assert out[True][2] >= 1 and out[False][2] == 0
    assert torch.equal(out[True][0], out[False][0])
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-4)
