"""Boxes data: generator, jsonl format, position roles under padding, pair builders, vocabulary errors."""

import random
from pathlib import Path

import pytest

from etk.data.datasets import pad_id
from etk.data.roles import TokenizationError, collate
from etk.data.vocab import VocabularyError, load_objects
from etk.models.tiny import tiny_tokenizer
from etk.tasks.entity_tracking.boxes import Context, Example, generate_examples
from etk.tasks.entity_tracking.data import task_vocab
from etk.tasks.entity_tracking.encode import encode_example
from etk.tasks.entity_tracking.jsonl import read_jsonl, write_jsonl
from etk.tasks.entity_tracking.pairs import (
    box_label_value_pairs,
    mean_ablation_examples,
    object_value_pairs,
    path_patching_pairs,
    positional_pairs,
)
from tests.helpers import mixed_length_examples

FIX = Path(__file__).parent / "fixtures"


def test_paper_template_and_box_order():
    objs = load_objects()
    assert len(objs) == 85 and objs[0] == "book" and objs[-1] == "magnet"
    exs = generate_examples(14, 7, objs, seed=3)
    assert exs[0].render().text.startswith("The ")
    assert exs[0].render().text.endswith(f". Box {exs[0].query_label} contains the")
    assert ", the " in exs[0].render().text
    for i, ex in enumerate(exs):
        assert ex.query == i % 7  # one query per box, in box order
        assert len(set(ex.context.objects)) == 7 and len(set(ex.context.labels)) == 7
    assert exs[0].context.sample_id == 0 and exs[7].context.sample_id == 1


def test_generator_seeded_and_sized():
    objs = load_objects()
    a = generate_examples(50, 5, objs, seed=1)
    assert a == generate_examples(50, 5, objs, seed=1)
    assert a != generate_examples(50, 5, objs, seed=2)
    assert len(a) == 50
    for n in (2, 26):
        assert len(generate_examples(n, n, objs, seed=0)) == n
    with pytest.raises(ValueError):
        generate_examples(5, 27, objs)


def test_jsonl_roundtrip(tmp_path):
    exs = generate_examples(21, 7, load_objects(), seed=0)
    write_jsonl(exs, tmp_path / "d.jsonl")
    assert read_jsonl(tmp_path / "d.jsonl") == exs


def test_jsonl_reads_paper_files_and_skips_repeated_labels():
    five = read_jsonl(FIX / "random_5_boxes_head.jsonl")
    assert len(five) == 15 and [e.query for e in five[:5]] == [0, 1, 2, 3, 4]
    assert five[0].answer == "magnet"
    with pytest.warns(UserWarning, match="repeated labels"):
        three = read_jsonl(FIX / "random_3_boxes_head.jsonl")
    assert len(three) == 27  # context 9 of the head repeats a label
    with pytest.raises(ValueError, match="repeated box labels"):
        read_jsonl(FIX / "random_3_boxes_head.jsonl", on_invalid="error")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("bos", [True, False])
def test_roles_decode_to_their_words(side, bos):
    tok = tiny_tokenizer(bos=bos)
    exs = mixed_length_examples(tok, n=9)
    batch = collate([encode_example(tok, e) for e in exs], pad_id(tok), side)
    assert len({len(e.context.objects) for e in exs}) > 1  # padding really happens
    dec = lambda b, i: tok.decode([int(batch.input_ids[b, i])]).strip()  # noqa: E731
    for b, ex in enumerate(exs):
        r = {k: v[b] for k, v in batch.roles.items() if v.dim() == 1}
        q = ex.query
        assert dec(b, r["query_label"]) == ex.query_label
        assert dec(b, r["prev_query_label"]) == ex.context.labels[q]
        assert r["prev_query_label"] < r["query_label"]
        assert dec(b, r["correct_object"]) == ex.answer
        assert tok.decode([int(batch.input_ids[b, r["last"]])]).strip() == "the"
        assert batch.attention_mask[b, r["last"]] == 1
        if side == "right":
            assert r["last"] == batch.attention_mask[b].sum() - 1
        else:
            assert r["last"] == batch.input_ids.shape[1] - 1
        assert int(batch.answer[b]) == tok.encode(" " + ex.answer, add_special_tokens=False)[0]
        first = int(batch.attention_mask[b].argmax())
        assert batch.position_ids[b, first] == 0
        assert (int(batch.input_ids[b, first]) == tok.bos_token_id) == bos


def test_vector_roles_on_equal_length_batch(tok):
    objects, labels = task_vocab(tok, 7)
    exs = generate_examples(7, 7, objects, labels, seed=0)
    batch = collate([encode_example(tok, e) for e in exs], pad_id(tok), "left")
    for b, ex in enumerate(exs):
        assert [tok.decode([int(batch.input_ids[b, i])]).strip() for i in batch.roles["objects"][b]] == list(ex.context.objects)
        assert [tok.decode([int(batch.input_ids[b, i])]).strip() for i in batch.roles["labels"][b]] == list(ex.context.labels)


def test_too_few_single_token_objects_is_a_clear_error(tok):
    with pytest.raises(VocabularyError, match="etk-tiny-bpe.*only .* single tokens.*needed"):
        task_vocab(tok, 200)


def test_multi_token_object_in_prompt_is_a_clear_error(tok):
    ex = Example(Context(0, ("otamatone", "book"), ("A", "B")), "A")
    with pytest.raises(TokenizationError, match="otamatone"):
        encode_example(tok, ex)


def test_multi_token_words_are_named():
    tok = tiny_tokenizer()
    from etk.data.vocab import filter_single_token

    with pytest.raises(VocabularyError, match="eggnog"):
        filter_single_token(tok, ["book", "eggnog", "otamatone"], 3, "objects")


@pytest.fixture
def pool():
    return generate_examples(70, 7, load_objects(), seed=0)


def test_path_patching_pairs(pool):
    pairs = path_patching_pairs(pool, random.Random(0))
    ids = {e.context.sample_id for e in pool}
    for p in pairs:
        assert p.target == p.base.answer
        assert p.source.context.sample_id in ids
        assert 0 <= p.source_box < 7
        assert len(p.source.context.objects) == len(p.base.context.objects)
    assert pairs == path_patching_pairs(pool, random.Random(0))


def test_mean_ablation_set(pool):
    ctxs = list({e.context.sample_id: e.context for e in pool}.values())
    exs = mean_ablation_examples(ctxs, random.Random(0))
    assert len(exs) == len(ctxs) and all(len(e.query_label) == 1 for e in exs)


def test_desiderata_pairs(pool):
    rng = random.Random(0)
    for p in positional_pairs(pool, pool, rng):
        assert p.source.query != p.base.query  # [BUG-pos] fixed
        assert p.target == p.base.context.objects[p.source.query]
    legacy = positional_pairs(pool, pool, rng, legacy=True)
    assert all(p.source.query != 0 for p in legacy)
    assert any(p.source.query == p.base.query for p in legacy)
    for p in object_value_pairs(pool, pool, rng):
        assert p.target == p.source.answer and p.source.query != p.base.query
    for p in box_label_value_pairs(pool, pool, rng):
        assert p.source.query_label in p.base.context.labels and p.source.query_label != p.base.query_label
        assert p.target == p.base.context.objects[p.base.context.labels.index(p.source.query_label)]
    # [BUG-substr] fixed: sources labelled B or T are used
    used = {p.source.query_label for p in box_label_value_pairs(pool, pool, rng)}
    assert {"B", "T"} & used


def test_box_label_value_targets_are_single_vocab_tokens(tok, pool):
    # [BUG-label]: targets are the leading-space piece of the object, a real vocabulary token
    objects, labels = task_vocab(tok, 7)
    exs = generate_examples(28, 7, objects, labels, seed=0)
    for p in box_label_value_pairs(exs, exs, random.Random(0)):
        e = encode_example(tok, p.base, answer=p.target)
        assert 0 <= e.answer_id < len(tok)
        assert tok.decode([e.answer_id]) == " " + p.target


@pytest.mark.parametrize("n,bs,seed", [(48, 8, 0), (50, 7, 3), (5, 8, 11)])
def test_rank_sliced_batches_match_a_seeded_shuffling_dataloader(n, bs, seed):
    """One process: the DCM / activation-patching sampler draws exactly what DataLoader(shuffle=True, generator)
    drew, epoch after epoch, so a run keeps its numbers whether or not it is distributed-ready."""
    import torch
    from torch.utils.data import DataLoader

    from etk.data.datasets import RankSlicedBatches

    ref = DataLoader(list(range(n)), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))
    ours = DataLoader(list(range(n)), batch_sampler=RankSlicedBatches(n, bs, True, seed))
    for _ in range(3):
        assert [b.tolist() for b in ours] == [b.tolist() for b in ref]
    assert [b.tolist() for b in DataLoader(list(range(n)), batch_sampler=RankSlicedBatches(n, bs))] == \
        [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
