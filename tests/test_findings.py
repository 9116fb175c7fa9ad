"""The study's reading is derived from intervals: a gap is only located when it is significant, and knockout
reports the layer range each edge is needed in."""

import pytest

from etk.methods.cmap.report import cmap_findings
from etk.methods.dcm.report import dcm_findings
from etk.methods.eval.report import accuracy_finding
from etk.methods.knockout.report import knockout_findings
from etk.report.findings import differ
from etk.results import ActivationPatchingResult, CMAPResult, DCMResult, EvalResult, KnockoutResult


def acc(a: float, lo: float, hi: float) -> dict:
    return {"accuracy": a, "ci_low": lo, "ci_high": hi}


def test_differ_uses_interval_overlap():
    assert differ(acc(0.1, 0.05, 0.15), acc(0.9, 0.85, 0.95))
    assert not differ(acc(0.5, 0.4, 0.6), acc(0.55, 0.45, 0.65))


def evaluated(model: str, a: float, lo: float, hi: float) -> EvalResult:
    return EvalResult(model=model, n_boxes=7, accuracy=a, ci_low=lo, ci_high=hi, n=200)


def test_accuracy_finding_states_significance():
    b, f, g = evaluated("b", 0.1, 0.05, 0.15), evaluated("f", 0.9, 0.85, 0.95), evaluated("g", 0.12, 0.06, 0.18)
    assert "significant change of +0.800" in accuracy_finding(b, f, 7)
    assert "no significant change" in accuracy_finding(b, g, 7)
    assert accuracy_finding(b, None, 7) is None


def cmap_doc(direction: str, src: dict, tgt: dict, **groups: dict) -> CMAPResult:
    return CMAPResult(pair="p", direction=direction, source_model="ft", target_model="base", head_sources={},
                      adapter_toggled=False, circuit="c", results={"source_alone": src, "target_alone": tgt, **groups})


def correct(k: int, n: int = 200):
    """Per-prompt correctness with the first k prompts right."""
    import torch

    return (torch.arange(n) < k).float()


def patched(k: int, src, tgt) -> dict:
    from etk.metrics import share_of_gap, wilson_interval

    lo, hi = wilson_interval(k, 200)
    return {**acc(k / 200, lo, hi), "share_of_gap": share_of_gap(correct(k), tgt, src)}


def test_cmap_locates_a_significant_gap_per_group():
    src, tgt = correct(160), correct(120)
    d = cmap_doc("forward", patched(160, src, tgt), patched(120, src, tgt), value_fetcher=patched(160, src, tgt),
                 pos_transmitter=patched(140, src, tgt), all=patched(160, src, tgt))
    assert d.results["pos_transmitter"]["share_of_gap"]["share"] == pytest.approx(0.5)
    (text,) = cmap_findings([d])
    assert "VF 100% [100%, 100%], PT 50% [" in text
    assert "All circuit heads together recover 100%" in text and "the VF heads carry the largest share" in text


def test_cmap_says_when_the_gain_is_not_in_the_heads():
    src, tgt = correct(160), correct(80)
    d = cmap_doc("forward", patched(160, src, tgt), patched(80, src, tgt), value_fetcher=patched(88, src, tgt),
                 all=patched(90, src, tgt))
    (text,) = cmap_findings([d])
    assert "most of the gain is not in these heads" in text


def test_share_of_gap_needs_the_same_prompts_and_a_gap():
    import pytest

    from etk.metrics import share_of_gap

    with pytest.raises(ValueError, match="same prompts"):
        share_of_gap(correct(10, 50), correct(10), correct(20))
    same = share_of_gap(correct(10), correct(10), correct(10))
    assert same["share"] is None and "no gap" in same["reason"]


def test_cmap_without_a_gap_does_not_invent_one():
    big = lambda a, lo, hi: {**acc(a, lo, hi), "n": 5000}  # noqa: E731
    d = cmap_doc("forward", big(0.98, 0.975, 0.984), big(0.985, 0.981, 0.988), value_fetcher=big(0.985, 0.981, 0.988))
    (text,) = cmap_findings([d])
    assert "no gain to locate" in text and "interchangeable" in text
    small = lambda a, lo, hi: {**acc(a, lo, hi), "n": 100}  # noqa: E731  overlapping, but a gain is not ruled out
    d = cmap_doc("forward", small(0.38, 0.29, 0.48), small(0.25, 0.17, 0.34), value_fetcher=small(0.30, 0.22, 0.40))
    (text,) = cmap_findings([d])
    assert "not distinguishable at this sample size (n = 100 / 100" in text and "no gain to locate" not in text


def test_dcm_findings_need_the_interval_above_the_floor():
    base = {"model": "m", "circuit": "c", "circuit_spec": "c.json", "group": "value_fetcher", "group_size": 20,
            "chance_floor_unpatched": {"accuracy": 0.05}}
    win = DCMResult(**base, desideratum="object_value", n_selected=12, selected_heads=[], test=acc(0.9, 0.8, 0.95))
    lose = DCMResult(**base, desideratum="positional", n_selected=3, selected_heads=[], test=acc(0.07, 0.02, 0.15))
    (text,) = dcm_findings([win, lose])
    assert "object value (12/20 heads" in text and "position" not in text
    (none,) = dcm_findings([lose])
    assert "No desideratum" in none


def test_knockout_finding_reports_where_the_edge_is_needed():
    edges = {"last->correct_object": {"start_layer": [0, 2, 4, 6], "accuracy": [0.0, 0.1, 0.88, 0.9]},
             "last->query_label": {"start_layer": [0, 2, 4, 6], "accuracy": [0.9, 0.9, 0.9, 0.9]}}
    ko = KnockoutResult(model="m", baseline={"accuracy": 0.9}, edges=edges)
    texts = knockout_findings([ko])
    assert "needed up to layer 2, free from layer 4 (worst 0.00 vs 0.90)" in texts[0]
    assert "never needed" in texts[1]
    low = KnockoutResult(model="weak", baseline={"accuracy": 0.08}, edges=edges)
    assert "too low for a drop to show" in knockout_findings([low])[0]


def test_functionality_change_is_judged_on_both_intervals():
    from etk.methods.activation_patching.report import functionality_findings

    heads = [[1, 2], [0, 1]]
    common = {"model": "f", "circuit": "c", "circuit_spec": "c.json", "group_size": 4, "chance_floor_unpatched": {}}
    dcm = [DCMResult(**common, group="value_fetcher", desideratum="object_value", n_selected=2, selected_heads=heads,
                     test=acc(0.7, 0.6, 0.8)),
           DCMResult(**common, group="pos_detector", desideratum="positional", n_selected=1, selected_heads=[[0, 3]],
                     test={**acc(0.4, 0.3, 0.5), "n": 40})]
    ap = [ActivationPatchingResult(model="b", group="value_fetcher", desideratum="object_value", heads=heads,
                                   random_heads=[], repeats=1, n=10,
                                   accuracy_percent={"selected_heads": {"pooled": acc(0.3, 0.2, 0.4)}}),
          ActivationPatchingResult(model="b", group="pos_detector", desideratum="positional", heads=[[0, 3]],
                                   random_heads=[], repeats=1, n=10,
                                   accuracy_percent={"selected_heads": {"pooled": {**acc(0.45, 0.35, 0.55), "n": 60}}})]
    (text,) = functionality_findings(dcm, ap, "b")
    assert "VF object value 0.700 [0.600, 0.800] vs 0.300 [0.200, 0.400] in `b`: stronger after fine-tuning" in text
    # overlapping intervals: "unchanged" only where a change that matters is ruled out (issue 24)
    assert "PD position 0.400 [0.300, 0.500] vs 0.450 [0.350, 0.550] in `b`: not distinguishable at this sample size (n = 40 / 60" in text
    assert functionality_findings(dcm, [], "b") == []
