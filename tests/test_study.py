"""The study report end to end on the tiny pair (small sizes), resumability, and cluster/multi-GPU config
composition."""

import json
import re

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONF
from tests.helpers import compose_run

SMALL = ["method=study", "pair=tiny", "pair.base.tiny.n_layers=3", "pair.finetuned.tiny.n_layers=3", "data.n_boxes=3",
         "data.n_examples=20", "logger=none", "trainer.enable_progress_bar=false", "method.eval.box_counts=[3]",
         "method.path_patching.n_examples=6", "method.path_patching.batch_size=6", "method.minimality.n_examples=6",
         "method.minimality.batch_size=6", "method.faithfulness.n_examples=8", "method.faithfulness.n_random=2",
         "method.faithfulness_curve.n_examples=8", "method.faithfulness_curve.batch_size=8",
         "method.circuit_search.n_search=6", "method.circuit_search.n_heldout=6", "method.ablation_prompts=8",
         "method.plan.dcm_groups=[value_fetcher]", "method.plan.dcm_desiderata=[object,position]",
         "method.dcm.n_train=16", "method.dcm.n_eval=8", "method.dcm.n_test=8", "method.dcm.batch_size=8",
         "method.activation_patching.n_examples=8", "method.activation_patching.repeats=1", "method.cmap.n_examples=8",
         "method.knockout.n_examples=4", "method.knockout.batch_size=4", "method.model_diff.n_examples=6",
         "method.model_diff.batch_size=3", "method.completeness.n_examples=8", "method.completeness.n_random=2",
         "method.attention_patterns.n_examples=8", "method.plan.split_dcm=[[value_fetcher,object]]",
         "method.positional_hypotheses.n_examples=8", "method.positional_hypotheses.batch_size=8"]


def test_study_report_end_to_end_and_resumable(tmp_path, capsys):
    res = compose_run(tmp_path, SMALL)
    report = (tmp_path / "report.md").read_text()
    for section in ("## 1. Task accuracy", "## 2. Circuits found by path patching", "## 3. Faithfulness",
                    "## 4. Circuit quality", "## 5. Position-aware circuits", "## 6. DCM", "## 7. Activation patching",
                    "## 8. Cross-model activation patching", "## 9. Model diffing", "## 10. Attention knockout",
                    "## 11. Completeness", "## 12. Attention patterns", "## 13. Causal impact", "causal_impact.png",
                    "**CMAP by part**", "**DCM by part**", "**Attention patterns (finetuned).**",
                    "**What fine-tuning changed (model diffing).**", "## Findings", "**Accuracy.**",
                    "**CMAP", "**Knockout last->correct_object.**", "curves.png", "all-heads reference"):
        assert section in report, section
    assert (tmp_path / "faithfulness_matrix.md").exists()
    assert json.loads((tmp_path / "cmap" / "forward" / "results.json").read_text())["direction"] == "forward"
    assert json.loads((tmp_path / "cmap" / "reverse" / "results.json").read_text())["target_model"] == "tiny_other"
    assert not any("skipped" in line for line in res["log"])
    # the split: shared = the fine-tuned circuit's heads the base circuit has in the same group, added = the rest
    from etk.circuits import load_circuit

    ft, base = (load_circuit(str(tmp_path / f"minimality/{m}/circuit.json")) for m in ("finetuned", "base"))
    shared, added = (load_circuit(str(tmp_path / f"circuits/{p}.json")) for p in ("shared", "added"))
    for g, heads in ft.groups.items():
        assert sorted(shared.groups[g] + added.groups[g]) == sorted(heads), g
        assert set(shared.groups[g]) <= set(base.groups.get(g, [])) and not set(added.groups[g]) & set(base.groups.get(g, []))
    comp = json.loads((tmp_path / "completeness" / "finetuned" / "results.json").read_text())
    assert {k: v["size"] for k, v in comp["named"].items()} == {"shared": len(shared.units()), "added": len(added.units())}
    assert res["log"][-1].startswith("total compute time")
    # every job's result loads as its method's type; its tables are rectangular and its headline numbers floats
    from etk.results import load_result

    found = sorted(tmp_path.rglob("results.json"))
    assert len(found) >= 20
    for p in found:
        r = load_result(p.parent)
        for header, rows in r.tables().values():
            assert all(len(row) == len(header) for row in rows), p
        assert all(isinstance(v, float) for v in r.headline().values()), p
    # a results.json of an earlier etk (the all-heads reference under its old name, "ceiling") still loads
    f = tmp_path / "faithfulness" / "base_circuit-on-base" / "results.json"
    doc = json.loads(f.read_text())
    old = {("ceiling" if k == "all_heads" else "relative_to_ceiling" if k == "relative_to_all_heads" else k): v
           for k, v in doc.items()}
    assert "ceiling" in old and "all_heads" not in old
    f.write_text(json.dumps(old))
    again = load_result(f.parent)
    assert again.all_heads == doc["all_heads"] and again.relative_to_all_heads == doc["relative_to_all_heads"]
    # a rerun skips every finished job; a corrupt result is recomputed
    (tmp_path / "knockout" / "base" / "results.json").write_text(json.dumps({"schema": "something/else"}))
    again = compose_run(tmp_path, SMALL)
    jobs = [line for line in again["log"] if re.search(r": (\d+ s|done earlier.*)$", line)]
    skipped = [line for line in jobs if "skipped" in line]
    assert len(skipped) == len(jobs) - 1
    assert any(line.startswith("knockout/base:") and "skipped" not in line for line in again["log"])


def test_unknown_study_step(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'telepathy'"):
        compose_run(tmp_path, ["method=study", "pair=tiny", "method.steps=[eval,telepathy]", "logger=none"])


@pytest.mark.parametrize("primary", ["patching", "dcm", "finetune"])
def test_cluster_launcher_and_multi_gpu_options_compose(primary):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(primary, overrides=["hydra/launcher=etk_slurm", "hydra.launcher.partition=gpu", "trainer.devices=4",
                                          "trainer.strategy=ddp"], return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_.lower()
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.partition == "gpu"
    assert cfg.trainer.devices == 4 and cfg.trainer.strategy == "ddp"


def test_mismatched_pair_fails_before_any_work(tmp_path):
    from etk.models.pair import PairMismatchError

    with pytest.raises(PairMismatchError, match="n_layers differs: tiny has 3, tiny_other has 2"):
        compose_run(tmp_path, ["method=study", "pair=tiny", "pair.base.tiny.n_layers=3", "pair.finetuned.tiny.n_layers=2",
                               "logger=none"])
    assert not (tmp_path / "accuracy").exists()


def test_activation_patching_jobs_cover_extra_models_and_variants(tmp_path):
    """plan.ap_models adds a job per head set in each model whose weights are there (others noted); plan.ap_variants
    adds one per variant of the head set's desideratum, with method.desideratum=<variant>; empty selections none."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from etk.results import Job
    from etk.study.plan import activation_patching_jobs

    dcm = [(Job("dcm", "finetuned-pos_transmitter-position", member="finetuned", group="pos_transmitter",
                desideratum="position"), SimpleNamespace(selected_heads=[[1, 2]], dir=tmp_path / "pt")),
           (Job("dcm", "finetuned-value_fetcher-object", member="finetuned", group="value_fetcher",
                desideratum="object"), SimpleNamespace(selected_heads=[], dir=tmp_path / "vf"))]
    notes = []
    study = SimpleNamespace(
        plan=OmegaConf.create({"ap_desiderata": ["object", "position"], "ap_members": ["base"],
                               "ap_models": ["llama_7b", "tiny", "base_model"],
                               "ap_variants": {"position": ["add_comma", "no_comma"]}}),
        task=None, results=lambda step, **m: [jr for jr in dcm if jr[0].matches(**m)], sizes=lambda step: [],
        note=notes.append, available_models=lambda names, step: [n for n in names if n != "llama_7b"],
        member=lambda m: OmegaConf.create({"name": f"{m}_model"}))
    jobs = activation_patching_jobs(study)
    assert [j.name for j in jobs] == [f"finetuned-pos_transmitter-position{v}-in-{m}" for m in ("base", "tiny")
                                      for v in ("", "-add_comma", "-no_comma")]
    assert [j.member for j in jobs] == ["base"] * 3 + [None] * 3
    assert "method.desideratum=no_comma" in jobs[2].overrides and not any("desideratum" in o for o in jobs[0].overrides)
    assert "model=tiny" in jobs[3].overrides and notes == [
        "activation_patching: model base_model is the base member, patched there once",  # the pair's own model: once
        "activation_patching/finetuned-value_fetcher-object: DCM selected no heads, nothing to patch"]


def test_missing_weights_names_what_is_missing(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from etk.models.loading import missing_weights as missing_of

    def missing_weights(cfg):
        return missing_of(OmegaConf.create(cfg))

    monkeypatch.delenv("ETK_MODEL_ROOT", raising=False)
    assert "needs local weights" in missing_weights({"name": "x", "source": "local", "root_subdir": "llama-7b"})
    (tmp_path / "config.json").write_text("{}")
    here = {"name": "x", "source": "local", "path": str(tmp_path)}
    assert missing_weights(here) is None
    assert "adapter" in missing_weights({**here, "adapters": [str(tmp_path / "lora")]})
    assert missing_weights({"name": "tiny", "source": "tiny"}) is None
