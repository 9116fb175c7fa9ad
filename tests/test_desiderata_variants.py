"""The paper's 11 additional positional desiderata: exact source text, target rule, sampling, roles, configs;
and the generalised Template (default text unchanged, per-segment formats, validation)."""

import random

import pytest
from omegaconf import OmegaConf

from etk.data.datasets import pad_id
from etk.data.roles import collate
from etk.tasks.entity_tracking.boxes import PAPER_TEMPLATE, Context, Example, Template, generate_examples
from etk.tasks.entity_tracking.data import make_template, task_vocab
from etk.tasks.entity_tracking.desiderata import desideratum_pairs
from etk.tasks.entity_tracking.encode import encode_example
from etk.tasks.entity_tracking.pairs import DESIDERATA, POSITIONAL_VARIANTS, positional_pairs
from tests.conftest import CONF

CTX = Context(0, ("apple", "computer", "book"), ("F", "Q", "A"))
DEFAULT_TEXT = "The apple is in Box F, the computer is in Box Q, the book is in Box A. Box Q contains the"
VARIANTS = sorted(POSITIONAL_VARIANTS)

# Source = CTX queried at box 1 (s = 1), rewritten by each variant; every query reads ". Box Q contains the".
EXPECTED_S1 = {
    "random_text_start":
        "There are a bunch of boxes containing objects, the apple is in Box F, the computer is in Box Q, "
        "the book is in Box A. Box Q contains the",
    "random_text_end":
        "The apple is in Box F, the computer is in Box Q, the book is in Box A, "
        "these are a bunch of boxes containing objects. Box Q contains the",
    "add_tokens_btw_box_and_obj":
        "The apple is in Box F, the computer is contained in the Box Q, the book is in Box A. Box Q contains the",
    "add_seg_start":
        "The apple is in Box O, the apple is in Box F, the computer is in Box Q, "
        "the book is in Box A. Box Q contains the",
    "add_seg_end":
        "The apple is in Box F, the computer is in Box Q, "
        "the book is in Box A, the apple is in Box O. Box Q contains the",
    "add_box_before_correct_segment":
        "The apple is in Box F, there are three additional boxes, Box PP, Box BB and Box AA, "
        "the computer is in Box Q, the book is in Box A. Box Q contains the",
    "incorrect_segment": DEFAULT_TEXT,
    "altered_box_obj_order":
        "The apple is in Box F, Box Q contains the computer, the book is in Box A. Box Q contains the",
    "altered_box_obj_association":
        "The apple is in Box F, the computer is not in Box Q, the book is in Box A. Box Q contains the",
    "no_comma": "The apple is in Box F the computer is in Box Q the book is in Box A. Box Q contains the",
    "add_comma": "The apple, is in Box F, the computer, is in Box Q, the book, is in Box A. Box Q contains the",
}

# The variants whose edit depends on the queried segment, at s = 0 and s = 2 (first and last segment).
EXPECTED_EDGES = {
    ("add_box_before_correct_segment", 0):
        "There are three additional boxes, Box PP, Box BB and Box AA, "
        "the apple is in Box F, the computer is in Box Q, the book is in Box A. Box F contains the",
    ("altered_box_obj_order", 0):
        "Box F contains the apple, the computer is in Box Q, the book is in Box A. Box F contains the",
    ("altered_box_obj_order", 2):
        "The apple is in Box F, the computer is in Box Q, Box A contains the book. Box A contains the",
    ("add_tokens_btw_box_and_obj", 2):
        "The apple is in Box F, the computer is in Box Q, the book is contained in the Box A. Box A contains the",
    ("altered_box_obj_association", 0):
        "The apple is not in Box F, the computer is in Box Q, the book is in Box A. Box F contains the",
}


def rewrite(name: str, s: int) -> Example:
    ex = Example(CTX, CTX.labels[s])
    return Example(CTX, CTX.labels[s], POSITIONAL_VARIANTS[name].edit(ex.template, s))


def assert_spans(ex: Example) -> None:
    r = ex.render()
    assert [r.text[sp.start:sp.end] for sp in r.objects] == list(ex.context.objects)
    assert [r.text[sp.start:sp.end] for sp in r.labels] == list(ex.context.labels)
    assert r.text[r.query_label.start:r.query_label.end] == ex.query_label
    assert r.query_label.end == len(r.text) - len(" contains the")


def test_default_template_renders_the_paper_text():
    ex = Example(CTX, "Q")
    assert ex.template == PAPER_TEMPLATE == Template() == make_template(None)
    r = ex.render()
    assert r.text == DEFAULT_TEXT
    assert [(s.start, s.end) for s in r.objects] == [(4, 9), (27, 35), (53, 57)]
    assert [(s.start, s.end) for s in r.labels] == [(20, 21), (46, 47), (68, 69)]
    assert (r.query_label.start, r.query_label.end) == (75, 76)


def test_template_overrides_are_canonical_hashable_and_checked():
    a = Template(overrides={1: "{container} {label} has the {obj}"})
    b = Template(overrides=[[1, "{container} {label} has the {obj}"]])  # as Hydra passes a list of lists
    assert a == b and hash(a) == hash(b) and a.overrides == ((1, "{container} {label} has the {obj}"),)
    assert Template().with_segment(1, "{container} {label} has the {obj}") == a
    assert a.segment_format(0) == Template().segment and a.segment_format(1).startswith("{container}")
    assert Example(CTX, "Q", a).render().text == (
        "The apple is in Box F, Box Q has the computer, the book is in Box A. Box Q contains the")
    for bad in ({0: "{det} {obj} is in {container}"}, {0: "{obj} {label} {colour}"}, {0: "{obj} {obj} {label}"},
                {-1: Template().segment}, {0: "{obj:>5} {label}"}):
        with pytest.raises(ValueError):
            Template(overrides=bad)
    with pytest.raises(ValueError, match="label"):
        Template(query="{container} contains the")
    with pytest.raises(ValueError, match="overrides segments"):
        Example(CTX, "Q", Template().with_segment(3, Template().segment)).render()


def test_every_variant_is_a_desideratum_with_a_config():
    assert len(VARIANTS) == 11
    for name in VARIANTS:
        assert name in DESIDERATA
        cfg = OmegaConf.load(CONF / "desideratum" / f"{name}.yaml")
        assert cfg.name == name and cfg.legacy is False


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_source_text_is_exact(name):
    ex = rewrite(name, 1)
    assert ex.render().text == EXPECTED_S1[name]
    assert_spans(ex)
    assert ex.query == 1 and ex.answer == "computer"  # the context and query are untouched


@pytest.mark.parametrize("name,s", sorted(EXPECTED_EDGES))
def test_variant_source_text_at_first_and_last_segment(name, s):
    ex = rewrite(name, s)
    assert ex.render().text == EXPECTED_EDGES[(name, s)]
    assert_spans(ex)


def test_variants_without_segment_edits_do_not_depend_on_s():
    for name in ("random_text_start", "random_text_end", "add_seg_start", "add_seg_end", "no_comma", "add_comma",
                 "incorrect_segment"):
        texts = {rewrite(name, s).render().text.rsplit(". ", 1)[0] for s in range(3)}
        assert texts == {EXPECTED_S1[name].rsplit(". ", 1)[0]}, name


@pytest.fixture(scope="module")
def pool(tok):
    objects, labels = task_vocab(tok, 4)
    return generate_examples(80, 4, objects, labels, seed=3)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_pairs_sampling_and_targets(name, pool):
    pairs = desideratum_pairs(name, pool, seed=7)
    plain = positional_pairs(pool, pool, random.Random(7))  # the same draws, unmodified
    assert len(pairs) == len(pool) == len(plain)
    shift = 1 if name == "incorrect_segment" else 0
    for p, q in zip(pairs, plain):
        s = p.source.query
        assert s is not None and s != p.base.query
        assert p.target == p.base.context.objects[(s + shift) % 4]
        assert p.base is q.base and p.base.template == PAPER_TEMPLATE  # the base is never modified
        assert (p.source.context, p.source.query_label) == (q.source.context, q.source.query_label)
        assert (p.source.template == PAPER_TEMPLATE) == (name == "incorrect_segment")
    if shift:
        assert all(p.target != p.base.context.objects[p.source.query] for p in pairs)
    assert pairs == desideratum_pairs(name, pool, seed=7)


@pytest.mark.parametrize("side", ["left", "right"])
def test_roles_decode_in_modified_sources(tok, pool, side):
    """One batch holding the sources of every variant (different lengths, so padding is real)."""
    sources = [(name, p.source) for name in VARIANTS for p in desideratum_pairs(name, pool[:12], seed=1)]
    batch = collate([encode_example(tok, ex) for _, ex in sources], pad_id(tok), side)
    assert len({len(ex.render().text) for _, ex in sources}) > 1
    assert int(batch.attention_mask.sum(1).min()) < batch.input_ids.shape[1]
    word = lambda b, i: tok.decode([int(batch.input_ids[b, int(i)])]).strip()  # noqa: E731
    for b, (name, ex) in enumerate(sources):
        r = batch.roles
        assert [word(b, i) for i in r["objects"][b]] == list(ex.context.objects), name
        assert [word(b, i) for i in r["labels"][b]] == list(ex.context.labels), name
        assert word(b, r["query_label"][b]) == ex.query_label, name
        assert word(b, r["prev_query_label"][b]) == ex.query_label, name
        assert word(b, r["correct_object"][b]) == ex.answer, name
        assert word(b, r["last"][b]) == "the" and batch.attention_mask[b, r["last"][b]] == 1, name
        assert sorted(r["objects"][b].tolist()) == r["objects"][b].tolist(), name  # context order is kept


@pytest.mark.parametrize("name,s,role,k,real", [
    ("add_seg_start", 0, "objects", 0, 1), ("add_seg_start", 0, "labels", 0, 1),  # inserted before: 2nd is real
    ("add_seg_end", 0, "objects", 0, 0), ("add_seg_end", 0, "labels", 0, 0),  # appended after: 1st is real
    ("add_box_before_correct_segment", 1, "labels", 1, -1),  # "Box AA" precedes the real "Box A" of segment 1
])
def test_inserted_words_equal_to_context_words_are_not_roles(tok, name, s, role, k, real):
    """Inserted words ("apple", "O", "AA") may coincide with context words; roles still point at the real segment
    because they come from render spans, not from searching the text."""
    ctx = Context(1, ("apple", "book", "computer"), ("O", "A", "B"))
    ex = Example(ctx, ctx.labels[s], POSITIONAL_VARIANTS[name].edit(PAPER_TEMPLATE, s))
    enc = encode_example(tok, ex)
    word = (ctx.objects if role == "objects" else ctx.labels)[k]
    word_id = tok.encode(" " + word, add_special_tokens=False)[0]
    context = enc.input_ids[: len(enc.input_ids) - 4]  # without "Box <L> contains the"
    hits = [i for i, t in enumerate(context) if t == word_id]
    assert len(hits) == 2  # the inserted copy and the real one
    assert enc.roles[role][k] == hits[real]
