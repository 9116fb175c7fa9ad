"""CMAP and activation patching: self-CMAP is the identity, different models differ only when heads are patched,
mismatched pairs fail clearly, and activation patching finds the planted head's object value."""

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from etk.data.datasets import pair_loader
from etk.interventions.components import HeadId
from etk.interventions.heads import HeadSet, capture
from etk.interventions.hooks import hooked
from etk.models.forward import last_logits
from etk.models.loading import LoadedModel
from etk.models.pair import PairMismatchError, check_compatible
from etk.models.tiny import tiny_llama, tiny_tokenizer
from etk.tasks import task_named
from etk.tasks.entity_tracking.boxes import generate_examples
from etk.tasks.entity_tracking.data import task_vocab
from etk.tasks.entity_tracking.desiderata import desideratum_pairs
from tests.helpers import batch_of, compose_run, planted_model

GROUPS = {"value_fetcher": [HeadId(1, 2), HeadId(0, 1)], "pos_detector": [HeadId(0, 3)], "struct_reader": [HeadId(1, 0)]}


def cmap_logits(source, target, batch, groups):
    hs = HeadSet.from_circuit(groups)
    src = capture(source, batch, hs)
    with hooked(target, patches=hs.patches(src, batch, 4)):
        return last_logits(target, batch)


def test_cmap_of_a_model_with_itself_is_the_identity(tiny, tok):
    batch, _ = batch_of(tok, n=6, n_boxes=3)
    assert torch.equal(cmap_logits(tiny, tiny, batch, GROUPS), last_logits(tiny, batch))


def test_cmap_between_different_models_changes_outputs_only_when_patching(tiny, tok):
    other = tiny_llama(len(tok), n_layers=2, n_heads=4, n_kv_heads=2, seed=9)
    batch, _ = batch_of(tok, n=6, n_boxes=3)
    plain = last_logits(tiny, batch)
    assert torch.equal(cmap_logits(other, tiny, batch, {}), plain)
    assert not torch.allclose(cmap_logits(other, tiny, batch, GROUPS), plain)
    # one head patched: equals a hand-written pre-hook writing the other model's z of head 2 at `last`
    want = capture(other, batch, HeadSet.at("last", [HeadId(1, 2)]))[("last", 1)][:, 0, 2]  # [B, D]
    pos = batch.roles["last"]

    def pre(mod, args):
        x = args[0].clone()
        for b in range(x.shape[0]):
            x[b, pos[b], 32:48] = want[b]
        return (x,)

    h = tiny.model.layers[1].self_attn.o_proj.register_forward_pre_hook(pre)
    try:
        ref = last_logits(tiny, batch)
    finally:
        h.remove()
    assert torch.allclose(cmap_logits(other, tiny, batch, {"value_fetcher": [HeadId(1, 2)]}), ref, atol=1e-6)


def test_head_sets_merge_groups_sharing_a_role():
    r = HeadSet.from_circuit({"value_fetcher": [HeadId(1, 2)], "pos_transmitter": [HeadId(1, 2), HeadId(0, 0)]}).roles
    assert r == {"last": [HeadId(1, 2), HeadId(0, 0)]}


def test_mismatched_pairs_give_clear_errors(tiny, tok):
    deeper = tiny_llama(len(tok), n_layers=3, n_heads=4, n_kv_heads=2)
    with pytest.raises(PairMismatchError, match="n_layers differs: base has 2, finetuned has 3"):
        check_compatible(tiny, deeper, tok, tok)
    other_tok = tiny_tokenizer(extra_words=("zzqxv",))
    wide = tiny_llama(len(other_tok), n_layers=2, n_heads=4, n_kv_heads=2)
    with pytest.raises(PairMismatchError, match="vocab_size differs"):
        check_compatible(tiny, wide, tok, other_tok)
    with pytest.raises(PairMismatchError, match="tokenizer vocabularies differ"):
        check_compatible(tiny, copy.deepcopy(tiny), tok, other_tok)


def test_activation_patching_finds_the_planted_object_value(tok):
    from etk.methods.activation_patching.module import ActivationPatchingModule

    model = planted_model(tok, head=2)
    objects, labels = task_vocab(tok, 2)
    exs = generate_examples(40, 2, objects, labels, seed=0)
    batch = next(iter(pair_loader(task_named("entity_tracking"), tok, desideratum_pairs("object_value", exs, 0), 40)))
    module = ActivationPatchingModule({"name": "planted"},
                                      {"planted": HeadSet.from_circuit({"value_fetcher": [HeadId(1, 2)]}),
                                       "wrong": HeadSet.from_circuit({"value_fetcher": [HeadId(1, 0)]})},
                                      model=LoadedModel(model, tok, {"name": "planted"}))
    module.on_predict_epoch_start()
    module.predict_step(batch, 0)
    unpatched, planted, wrong = module.acc.compute().tolist()
    assert planted > 0.3 and unpatched < 0.1 and wrong == unpatched  # the head carries the source's objects


def test_cmap_and_activation_patching_cli(tmp_path):
    res = compose_run(tmp_path / "cmap", ["method=cmap", "pair=tiny_self", "data.n_boxes=3", "method.n_examples=8",
                                          "logger=none", "trainer.enable_progress_bar=false"])
    r = res.results
    assert r["all"]["accuracy"] == r["target_alone"]["accuracy"] == r["source_alone"]["accuracy"]
    assert (tmp_path / "cmap" / "cmap_table.md").exists()
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"group": "value_fetcher", "desideratum": "object_value", "heads": [[1, 2]]}))
    ap = compose_run(tmp_path / "ap", ["method=activation_patching", f"method.heads={heads}", "model=tiny",
                                       "data.n_boxes=3", "method.n_examples=8", "method.repeats=2", "logger=none",
                                       "trainer.enable_progress_bar=false"])
    assert len(ap.accuracy_percent["selected_heads"]["per_repeat"]) == 2


def test_one_source_run_serves_every_head_set(tiny, tok):
    """capture (cut after its deepest layer, or a full forward with logits) equals o_proj inputs
    captured by a hand-written hook on a plain forward; the union of head sets covers each set."""
    batch, _ = batch_of(tok, n=6, n_boxes=3)
    seen = {}
    hooks = [tiny.model.layers[j].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args, j=j: seen.__setitem__(j, args[0].detach().clone())) for j in range(2)]
    with torch.no_grad():
        plain = tiny(**batch.model_inputs()).logits
    for h in hooks:
        h.remove()
    sets = [HeadSet.from_circuit({"value_fetcher": [HeadId(1, 2)]}), HeadSet.from_circuit({"pos_detector": [HeadId(0, 3)]})]
    union = HeadSet.union(sets)
    assert union.roles == {"last": [HeadId(1, 2)], "query_label": [HeadId(0, 3)]}
    b = torch.arange(6)
    early = capture(tiny, batch, HeadSet.at("query_label", [HeadId(0, 3)]))
    assert set(early) == {("query_label", 0)}
    full, logits = capture(tiny, batch, union, logits=True)
    # the LM head on [B, d] vs on [B, T, d]: another GEMM shape, equal up to its summation order on some CPUs
    assert torch.allclose(logits, plain[b, batch.roles["last"]], rtol=1e-6, atol=1e-6)
    for (role, j), z in list(full.items()) + list(early.items()):
        assert torch.equal(z[:, 0], seen[j][b, batch.roles[role]].unflatten(-1, (4, 16)))
    assert capture(tiny, batch, HeadSet()) == {}


def _lora_pair(tiny, tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    peft.save_pretrained(tmp_path / "lora")
    base = {"name": "b", "source": "local", "path": str(tiny_dir), "adapters": [], "dtype": "float32"}
    return base, {**base, "name": "f", "adapters": [str(tmp_path / "lora")]}


def _storage(models) -> int:
    """Parameters held in memory by these models, counting shared tensors once."""
    seen = {}
    for m in models:
        for p in m.parameters():
            seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def test_lora_pair_toggles_one_copy_of_the_weights(tiny, tiny_dir, tok, tmp_path):
    from etk.models.loading import load_model
    from etk.models.pair import load_pair, toggled_adapter

    base_cfg, ft_cfg = _lora_pair(tiny, tiny_dir, tmp_path)
    assert toggled_adapter(base_cfg, ft_cfg) == ft_cfg["adapters"][0]
    assert toggled_adapter(ft_cfg, base_cfg) is None and toggled_adapter(base_cfg, {**ft_cfg, "dtype": "bf16"}) is None
    toggled, merged = load_pair(base_cfg, ft_cfg), load_pair(base_cfg, ft_cfg, toggle=False)
    assert toggled.toggled and toggled.base is toggled.finetuned and not merged.toggled
    n_base = sum(p.numel() for p in tiny.parameters())
    assert _storage([toggled.base]) < 1.2 * n_base < 1.8 * n_base < _storage([merged.base, merged.finetuned])
    batch, _ = batch_of(tok, n=6, n_boxes=3)
    plain_base = last_logits(load_model(OmegaConf.create(base_cfg))[0], batch)
    with toggled.use("base") as m:
        assert torch.equal(last_logits(m, batch), plain_base)  # adapter off = the base weights, bit for bit
    with toggled.use("finetuned") as m:
        ft = last_logits(m, batch)
    assert torch.allclose(ft, last_logits(merged.finetuned, batch), atol=1e-5)
    assert not torch.allclose(ft, plain_base, atol=1e-4)
    # CMAP through the toggled pair equals CMAP between the two merged models
    roles = HeadSet.from_circuit(GROUPS)
    with toggled.use("finetuned") as m:
        src = capture(m, batch, roles)
    with toggled.use("base") as m, hooked(m, patches=roles.patches(src, batch, 4)):
        got = last_logits(m, batch)
    assert torch.allclose(got, cmap_logits(merged.finetuned, merged.base, batch, GROUPS), atol=1e-5)
    assert not torch.allclose(got, plain_base, atol=1e-4)


def test_stacked_lora_pair_toggles_the_top_adapter_exactly(tiny, tiny_dir, tok, tmp_path):
    """pair=smol_enhance's structure: the base member is weights + adapter A (merged), the fine-tuned member is the
    same + adapter B. CMAP runs on one copy, B toggled: off is the base member bit for bit, on is the fine-tuned
    member loaded on its own (A and B merged at load) to a relative tolerance, and the CMAP module's rows (both
    models alone, each head set patched) equal hand-built runs of the two merged models."""
    from peft import LoraConfig, get_peft_model

    from etk.methods.cmap.module import CMAPJob, CMAPModule
    from etk.models.loading import load_model
    from etk.models.pair import load_pair, toggled_adapter

    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        peft = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                              target_modules=["q_proj", "v_proj", "o_proj"]))
        peft.save_pretrained(tmp_path / name)
    base_cfg = {"name": "weak", "source": "local", "path": str(tiny_dir), "adapters": [str(tmp_path / "a")],
                "dtype": "float32"}
    ft_cfg = {**base_cfg, "name": "enhanced", "adapters": [str(tmp_path / "a"), str(tmp_path / "b")]}
    assert toggled_adapter(base_cfg, ft_cfg) == str(tmp_path / "b")
    pair = load_pair(base_cfg, ft_cfg)
    batch, examples = batch_of(tok, n=8, n_boxes=3)
    pair.check([e.render().text for e in examples])
    weak, enhanced = load_model(OmegaConf.create(base_cfg))[0], load_model(OmegaConf.create(ft_cfg))[0]
    with pair.use("base") as m:
        assert torch.equal(last_logits(m, batch), last_logits(weak, batch))  # B off: the base member exactly
    with pair.use("finetuned") as m:
        on = last_logits(m, batch)
    off, merged = last_logits(weak, batch), last_logits(enhanced, batch)
    # B on: the model with both adapters merged into its weights (unmerged LoRA sums in another order)
    torch.testing.assert_close(on, merged, rtol=1e-4, atol=1e-4 * float(merged.abs().max()))
    assert not torch.allclose(on, off, rtol=1e-3, atol=1e-3 * float(off.abs().max()))  # and B has an effect
    assert not torch.allclose(off, last_logits(tiny, batch), atol=1e-4)  # as has A
    sets = {"value_fetcher": HeadSet.from_circuit({"value_fetcher": GROUPS["value_fetcher"]}),
            "all": HeadSet.from_circuit(GROUPS)}
    module = CMAPModule(base_cfg, ft_cfg, [CMAPJob("forward", sets)], pair=pair)
    module.on_predict_epoch_start()
    module.predict_step(batch, 0)
    rows = module.acc.per_example()  # [2 + 2, N]: source alone, target alone, each set
    want = [last_logits(enhanced, batch), last_logits(weak, batch)]
    want += [cmap_logits(enhanced, weak, batch, g) for g in ({"value_fetcher": GROUPS["value_fetcher"]}, GROUPS)]
    for r, logits in zip(rows, want):
        assert torch.equal(r.bool(), logits.argmax(-1) == batch.answer)
    assert not torch.allclose(want[3], want[1], atol=1e-4)  # the patch changes the weak model's outputs


def test_shipped_enhancement_pair_is_a_toggled_lora_pair():
    from hydra import compose, initialize_config_dir

    from etk.models.pair import toggled_adapter
    from tests.conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("patching", overrides=["pair=smol_enhance"])
    base, ft = (OmegaConf.to_container(m, resolve=True) for m in (cfg.pair.base, cfg.pair.finetuned))
    assert base["name"] == "smollm2_tracker_weak" and ft["name"] == "smollm2_weak_enhanced"
    assert toggled_adapter(base, ft) == "etk:assets/adapters/weak_enhanced"
    assert cfg.pair.name == "smol_enhance"


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_cmap_module_between_two_different_models_patches_in_its_direction(tok, direction):
    """CMAPModule on two different tiny models (loaded separately, no adapter): row 0 is the source model, row 1 the
    target, and each head set's row equals the target with the source's z patched in by hand-built hooks — with
    source and target swapped by `direction`."""
    from etk.methods.cmap.module import CMAPJob, CMAPModule
    from etk.models.loading import load_model

    base_cfg = {"name": "tiny", "source": "tiny", "tiny": {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "seed": 0},
                "dtype": "float32"}
    ft_cfg = {**base_cfg, "name": "tiny_other", "tiny": {**base_cfg["tiny"], "seed": 1}}
    sets = {"vf": HeadSet.from_circuit({"value_fetcher": GROUPS["value_fetcher"]}), "all": HeadSet.from_circuit(GROUPS)}
    module = CMAPModule(base_cfg, ft_cfg, [CMAPJob(direction, sets)])
    module.configure_model()  # Lightning's hook, called here as the trainer would: loads the pair from the configs
    assert not module.pair.toggled
    batch, _ = batch_of(tok, n=8, n_boxes=3)
    base, ft = (load_model(OmegaConf.create(c))[0] for c in (base_cfg, ft_cfg))
    src, tgt = (ft, base) if direction == "forward" else (base, ft)
    module.on_predict_epoch_start()
    module.predict_step(batch, 0)
    rows, logp = module.acc.per_example(), module.acc.per_example_logp()  # [4, N]
    hand = [last_logits(src, batch), last_logits(tgt, batch)] + [cmap_logits(src, tgt, batch, g) for g in
                                                                  ({"value_fetcher": GROUPS["value_fetcher"]}, GROUPS)]
    for r, lp, logits in zip(rows, logp, hand):
        assert torch.equal(r.bool(), logits.argmax(-1) == batch.answer)
        assert torch.allclose(lp, logits.log_softmax(-1)[torch.arange(len(batch)), batch.answer], atol=1e-5)
    assert not torch.allclose(hand[3], hand[1], atol=1e-4) and not torch.allclose(hand[0], hand[1], atol=1e-4)
    # the logits the rows come from: recompute the patched target through the module's own pair
    with module.pair.use("base" if direction == "forward" else "finetuned") as m:
        assert torch.allclose(last_logits(m, batch), hand[1], atol=1e-6)


def test_activation_patching_reuses_unpatched_bases_exactly(tmp_path, monkeypatch):
    """Later repeats and head sets read the base prompts' unpatched logits and prefix computed once (same prompts,
    checked token by token): every number equals a run with the cache off, which recomputes them."""
    from etk.methods.activation_patching import module as ap_module

    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"group": "value_fetcher", "desideratum": "object_value", "heads": [[1, 2], [0, 1]]}))
    args = ["method=activation_patching", f"method.heads={heads}", "model=tiny", "data.n_boxes=3", "method.n_examples=9",
            "method.batch_size=4", "method.repeats=3", "logger=none", "trainer.enable_progress_bar=false"]
    built = []
    orig = ap_module.ActivationPatchingModule.on_predict_epoch_start

    def record(self):  # the modules the runs themselves build, once each
        orig(self)
        if self not in built:
            built.append(self)

    monkeypatch.setattr(ap_module.ActivationPatchingModule, "on_predict_epoch_start", record)
    reused = compose_run(tmp_path / "a", args)
    plain = compose_run(tmp_path / "b", args + ["method.cache_mb=0"])
    assert built[0].cache.hits > built[0].cache.misses > 0 and built[1].cache.hits == 0
    strip = lambda r: {k: v for k, v in r.to_json().items() if k not in ("resources", "config")}  # noqa: E731
    assert strip(reused) == strip(plain)


def test_cmap_jobs_of_both_directions_in_one_pass_equal_each_job_alone(tok):
    """Several CMAP jobs (forward and reverse, different head sets) in one module: each member runs once per batch
    for all of them, and every job's per-example correctness and log-probabilities equal the reference (its own
    source and target forwards)."""
    from etk.methods.cmap.module import CMAPJob, CMAPModule

    base_cfg = {"name": "tiny", "source": "tiny", "tiny": {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "seed": 0},
                "dtype": "float32"}
    ft_cfg = {**base_cfg, "name": "tiny_other", "tiny": {**base_cfg["tiny"], "seed": 1}}
    jobs = [CMAPJob("forward", {"vf": HeadSet.from_circuit({"value_fetcher": GROUPS["value_fetcher"]}),
                                "all": HeadSet.from_circuit(GROUPS)}),
            CMAPJob("reverse", {"all": HeadSet.from_circuit(GROUPS)}),
            CMAPJob("forward", {"sr": HeadSet.from_circuit({"struct_reader": GROUPS["struct_reader"]})})]
    batch, _ = batch_of(tok, n=8, n_boxes=3)
    out = {}
    for reference in (True, False):
        module = CMAPModule(base_cfg, ft_cfg, jobs, reference=reference)
        module.configure_model()
        module.on_predict_epoch_start()
        module.predict_step(batch, 0)
        out[reference] = [(a.per_example(), a.per_example_logp()) for a in module.accs]
    for (c_ref, lp_ref), (c, lp) in zip(out[True], out[False]):
        assert c.shape[0] == lp.shape[0] >= 3
        assert torch.equal(c, c_ref)
        torch.testing.assert_close(lp, lp_ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(out[False][0][1][0], out[False][1][1][0])  # the two directions' sources differ
