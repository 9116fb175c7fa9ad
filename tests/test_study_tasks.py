"""The IOI study and the cross-task study end to end on the tiny pair (small sizes): `method=study task=ioi` writes
the IOI report (its groups, its desiderata, its knockout edges), and `method=study_tasks tasks=[entity_tracking,ioi]`
runs both studies, the specificity control in both directions, and the "Across tasks" report; a rerun skips every
finished job."""

import json

from tests.helpers import compose_run

COMMON = ["pair=tiny", "pair.base.tiny.n_layers=3", "pair.finetuned.tiny.n_layers=3", "data.n_boxes=3",
          "data.n_examples=20", "logger=none", "trainer.enable_progress_bar=false", "method.eval.box_counts=[3]",
          "method.path_patching.n_examples=6", "method.path_patching.batch_size=6", "method.minimality.n_examples=6",
          "method.minimality.batch_size=6", "method.faithfulness.n_examples=8", "method.faithfulness.n_random=2",
          "method.faithfulness_curve.n_examples=8", "method.faithfulness_curve.batch_size=8",
          "method.circuit_search.n_search=6", "method.circuit_search.n_heldout=6", "method.ablation_prompts=8",
          "method.dcm.n_train=16", "method.dcm.n_eval=8", "method.dcm.n_test=8", "method.dcm.batch_size=8",
          "method.activation_patching.n_examples=8", "method.activation_patching.repeats=1", "method.cmap.n_examples=8",
          "method.knockout.n_examples=4", "method.knockout.batch_size=4", "method.model_diff.n_examples=6",
          "method.model_diff.batch_size=3"]


def test_the_ioi_study_end_to_end(tmp_path):
    res = compose_run(tmp_path, ["method=study", "task=ioi", "method.plan.dcm_groups=[name_mover]",
                                 "method.plan.dcm_desiderata=[io_name,s_position]", *COMMON])
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# IOI study")
    for text in ("## 1. Task accuracy", "logit difference", "NM (top heads)", "PREV (top heads)", "## 6. DCM",
                 "**Knockout last->IO.**", "## 10. Attention knockout"):
        assert text in report, text
    pp = json.loads((tmp_path / "path_patching" / "base" / "results.json").read_text())
    assert list(pp["stages"]) == ["name_mover", "s_inhibition", "induction", "previous_token"]
    assert pp["config"]["task"]["name"] == "ioi"
    dcm = sorted(p.parent.name for p in (tmp_path / "dcm").glob("*/results.json"))
    whole = [d for d in dcm if "-shared-" not in d and "-added-" not in d]
    assert whole == ["finetuned-name_mover-io_name", "finetuned-name_mover-s_position"]
    # the split's masks: IOI's CMAP choice (NM io_name, SI s_position) on each part that has heads in the group
    assert set(dcm) - set(whole) <= {f"finetuned-{p}-{g}" for p in ("shared", "added")
                                     for g in ("name_mover-io_name", "s_inhibition-s_position")}
    for text in ("## 11. Completeness", "## 12. Attention patterns", "## 13. Causal impact", "**CMAP by part**"):
        assert text in report, text
    assert not (tmp_path / "positional_hypotheses").exists()  # IOI has no positional hypotheses
    ko = json.loads((tmp_path / "knockout" / "base" / "results.json").read_text())
    assert set(ko["edges"]) == {"last->IO", "last->S2", "last->random", "S2->S1", "S2->S1+1", "S2->random"}
    assert res["log"][-1].startswith("total compute time")


def test_the_cross_task_study_end_to_end_and_resumable(tmp_path):
    args = ["method=study_tasks", "tasks=[entity_tracking,ioi]",
            "method.steps=[eval,path_patching,minimality,faithfulness,cmap]", "method.specificity.n_examples=8",
            "method.specificity.batch_size=8", "method.specificity.n_random=2", *COMMON]
    compose_run(tmp_path, args)
    report = (tmp_path / "report.md").read_text()
    for text in ("## Across tasks", "## Specificity control", "[entity_tracking](entity_tracking/report.md)",
                 "| entity_tracking |", "| ioi |", "**Entity-tracking.**", "**IOI.**"):
        assert text in report, text
    assert (tmp_path / "ioi" / "report.md").read_text().startswith("# IOI study")
    spec = sorted(p.parent.name for p in (tmp_path / "specificity").glob("*/results.json"))
    assert spec == ["entity_tracking_circuit-on-ioi-base", "entity_tracking_circuit-on-ioi-finetuned",
                    "ioi_circuit-on-entity_tracking-base", "ioi_circuit-on-entity_tracking-finetuned"]
    doc = json.loads((tmp_path / "specificity" / spec[0] / "results.json").read_text())
    assert doc["circuit_task"] == "entity_tracking" and doc["config"]["task"]["name"] == "ioi"
    before = {p: p.stat().st_mtime for p in tmp_path.rglob("results.json")}
    compose_run(tmp_path, args)  # resumable: nothing is recomputed
    assert {p: p.stat().st_mtime for p in tmp_path.rglob("results.json")} == before
