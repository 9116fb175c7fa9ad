"""The positional hypotheses (the paper's third open question): each hypothesis's target computed by hand on
constructed prompts, the scoring counted by hand, cross-length pairs valid, and the method end to end on tiny."""

import random

import torch

from etk.data.roles import Encoded
from etk.tasks.base import Pair
from etk.tasks.entity_tracking.boxes import Context, Example
from etk.tasks.entity_tracking.hypotheses import HYPOTHESES, cross_length_pairs, hypothesis_targets

OBJ7 = ("apple", "book", "cup", "desk", "egg", "fan", "gem")
LAB7 = ("A", "B", "C", "D", "E", "F", "G")


def encoded(objects: list[int], length: int) -> Encoded:
    return Encoded(list(range(length)), {"objects": objects, "correct_object": -1}, -1)


def test_targets_of_each_hypothesis_by_hand():
    base = Example(Context(0, OBJ7, LAB7), "A")
    source = Example(Context(1, ("hat", "ink", "jar", "key", "lid"), ("P", "Q", "R", "S", "T")), "Q")  # query 1 of 5
    b = encoded([2, 8, 14, 20, 26, 32, 38], 45)  # base objects every 6 tokens, 45 tokens
    s = encoded([5, 11, 17, 23, 29], 40)
    s.roles["correct_object"] = 11  # the source's queried object: token 11 of 40
    t = hypothesis_targets(Pair(base, source, "book"), b, s)
    # from the start: index 1 -> book; from the end: 7 - (5 - 1) = 3 -> desk; token 11 from the start is nearest
    # base token 8 (book); 40 - 11 = 29 tokens before the end is nearest 45 - 14 = 31 (cup)
    assert t == {"ordinal_start": "book", "ordinal_end": "desk", "offset_start": "book", "offset_end": "cup"}
    assert set(t) == set(HYPOTHESES)


def test_ordinal_from_the_start_is_undefined_beyond_the_base():
    base = Example(Context(0, OBJ7[:3], LAB7[:3]), "A")
    source = Example(Context(1, OBJ7[:5], ("P", "Q", "R", "S", "T")), "T")  # query 4 of 5, base has 3 boxes
    s = encoded([1, 2, 3, 4, 5], 9)
    s.roles["correct_object"] = 5
    t = hypothesis_targets(Pair(base, source, "cup"), encoded([1, 2, 3], 6), s)
    assert t["ordinal_start"] is None and t["ordinal_end"] == "cup"


def test_cross_length_pairs_always_name_a_base_box():
    bases = [Example(Context(i, OBJ7[:5], LAB7[:5]), LAB7[i % 5]) for i in range(20)]
    pool = [Example(Context(100 + i, OBJ7, LAB7), LAB7[i % 7]) for i in range(30)]  # 7-box sources, 5-box bases
    pairs = cross_length_pairs(bases, pool, random.Random(0))
    for p in pairs:
        q = p.source.query
        assert q < 5 or 7 - q <= 5
        assert p.target == p.base.context.objects[q if q < 5 else 5 - (7 - q)]


def test_score_counts_each_hypothesis_on_its_own_valid_pairs(tok):
    from etk.data.vocab import single_token_id
    from etk.methods.positional_hypotheses.run import rates, target_ids

    words = ["apple", "book", "cup"]
    ids = {w: single_token_id(tok, w) for w in words}
    assert all(v is not None for v in ids.values())
    targets = [{"h1": "book", "h2": "cup"}, {"h1": "book", "h2": "book"}, {"h1": None, "h2": "cup"}]
    answers = ["apple", "book", "apple"]  # pair 2's h1 and h2 are the base's own answer: not counted
    pred = torch.tensor([[ids["apple"], ids["book"], ids["apple"]],   # unpatched: the base answers
                         [ids["book"], ids["book"], ids["cup"]],      # selected
                         [ids["cup"], ids["apple"], ids["apple"]]])   # random
    tid = target_ids(targets, answers, tok, ("h1", "h2"))
    out = rates(pred, tid, ("h1", "h2"))
    assert out["h1"]["selected"]["accuracy"] == 1.0 and out["h1"]["selected"]["n"] == 1
    assert out["h2"]["selected"]["accuracy"] == 0.5 and out["h2"]["selected"]["n"] == 2
    assert out["h2"]["random"]["accuracy"] == 0.5 and out["h1"]["unpatched"]["accuracy"] == 0.0
    assert tid.tolist() == [[ids["book"], -1, -1], [ids["cup"], -1, ids["cup"]]]


def test_the_method_end_to_end_on_tiny(tmp_path):
    import json

    from tests.helpers import compose_run

    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"group": "pos_transmitter", "desideratum": "positional", "heads": [[1, 2], [0, 3]]}))
    r = compose_run(tmp_path / "run", ["method=positional_hypotheses", f"method.heads={heads}", "model=tiny",
                                       "data.n_boxes=5", "method.n_examples=12", "method.batch_size=6",
                                       "method.variants=[add_seg_start,no_comma]", "method.source_boxes=[3]",
                                       "logger=none", "trainer.enable_progress_bar=false"])
    assert list(r.probes) == ["add_seg_start", "no_comma", "3_box_sources"]
    assert r.n_pooled == sum(p["disagreeing_pairs"] for p in r.probes.values()) > 0
    # 3-box sources in 5-box bases: from the start and from the end always name different boxes, so every pair
    # where neither is the base's own answer tells them apart
    cross = r.probes["3_box_sources"]
    assert 0 < cross["pairwise"]["ordinal_start|ordinal_end"]["n"] <= cross["disagreeing_pairs"] <= 12
    for p in r.probes.values():
        assert set(p["hypotheses"]) == set(HYPOTHESES)
        assert all(0 <= v["selected"]["accuracy"] <= 1 for v in p["hypotheses"].values() if v["selected"]["n"])
    assert r.group == "pos_transmitter" and r.role == "last"


def test_the_verdict_compares_each_hypothesis_head_to_head():
    from types import SimpleNamespace

    from etk.methods.positional_hypotheses.report import verdict

    def ci(lo, hi):
        return {"selected": {"accuracy": (lo + hi) / 2, "ci_low": lo, "ci_high": hi}}

    pooled = {"ordinal_start": ci(0.37, 0.47), "offset_start": ci(0.41, 0.51), "ordinal_end": ci(0.27, 0.36)}
    pairwise = {  # offset_start vs each other, over the pairs where the two differ
        "ordinal_start|offset_start": {"n": 80, "ordinal_start": ci(0.2, 0.4), "offset_start": ci(0.3, 0.5)},
        "ordinal_end|offset_start": {"n": 96, "ordinal_end": ci(0.1, 0.2), "offset_start": ci(0.6, 0.8)},
        "ordinal_start|ordinal_end": {"n": 96, "ordinal_start": ci(0.6, 0.8), "ordinal_end": ci(0.1, 0.2)}}
    d = SimpleNamespace(model="m", n_pooled=400, pooled=pooled, pairwise=pairwise)
    text = verdict(d, "PT")
    assert "the token offset from the start leads but is not distinguishable from the ordinal from the first box" in text
    assert text.endswith("; ruled out: ordinal from the last box.")
    assert "vs ordinal from the first box: 0.400 [0.300, 0.500] against 0.300 [0.200, 0.400] on 80 pairs" in text
    d.pooled = {"ordinal_start": ci(0.6, 0.7), "ordinal_end": ci(0.1, 0.2)}
    assert "the heads follow the ordinal from the first box; ruled out: ordinal from the last box" in verdict(d, "PT")


def test_apart_and_pairwise_count_only_pairs_where_the_objects_differ():
    from etk.methods.positional_hypotheses.run import apart_of, pairwise

    ids = torch.tensor([[5, 5, -1, 7], [5, 6, 6, 8]])  # [H=2, N=4]: pair 0 agrees, pair 2 has one valid object
    pred = torch.tensor([[0, 0, 0, 0], [5, 6, 6, 7], [9, 9, 9, 9]])  # unpatched, selected, random
    assert apart_of(ids).tolist() == [False, True, False, True]
    pw = pairwise(ids, pred, ("a", "b"))["a|b"]
    assert pw["n"] == 2
    assert pw["a"]["selected"]["accuracy"] == 0.5 and pw["b"]["selected"]["accuracy"] == 0.5
    assert pw["a"]["random"]["accuracy"] == 0.0
