"""The user's own data: a paper-format dataset.jsonl (`data.path`), an objects file (`data.objects`), templates."""

import json

import pytest

from etk.data.vocab import VocabularyError, load_objects
from etk.errors import ConfigError, DataError
from etk.models.tiny import tiny_tokenizer
from etk.tasks.entity_tracking.data import task_examples
from etk.tasks.entity_tracking.jsonl import read_jsonl, read_jsonl_lines, write_jsonl
from tests.conftest import ROOT
from tests.helpers import compose_cfg

FIX = ROOT / "tests" / "fixtures"
COMMON = ["model=tiny", "logger=none", "trainer.enable_progress_bar=false", "data.n_boxes=3"]


def run_eval(tmp_path, overrides):
    from etk.cli import run_method as run
    from etk.validate import validate

    cfg = compose_cfg("patching", tmp_path, COMMON + overrides)
    validate(cfg)
    run(cfg)
    return json.loads((tmp_path / "results.json").read_text())


def paper_format_lines(n):
    """n lines in the paper's format whose words the tiny tokenizer keeps whole (3 boxes, paper template)."""
    from etk.tasks.entity_tracking.boxes import generate_examples
    from etk.tasks.entity_tracking.data import task_vocab

    objects, labels = task_vocab(tiny_tokenizer(), 3)
    exs = generate_examples(n, 3, objects, labels, seed=4)
    return exs


def five_lines(tmp_path):
    path = tmp_path / "five.jsonl"
    write_jsonl(paper_format_lines(5), path)
    return path


def test_data_path_runs_on_the_files_lines(tmp_path):
    path = five_lines(tmp_path)
    doc = run_eval(tmp_path / "run", [f"data.path={path}"])
    assert doc["n"] == 5 and doc["config"]["data"]["path"] == str(path)
    want = [json.loads(x)["sentence"] for x in path.read_text().splitlines()]
    cfg = compose_cfg("patching", tmp_path / "c", COMMON + [f"data.path={path}"])
    got = [f"{ex.render().text} {ex.answer}." for ex in task_examples(cfg.data, tiny_tokenizer())]
    assert got == want  # the file's prompts, in file order, not generated ones


def test_the_papers_file_round_trips(tmp_path):
    src = FIX / "random_3_boxes_head.jsonl"
    with pytest.warns(UserWarning, match=r"lines \[2[5-9]"):  # the ambiguous context is named by its lines
        lines = read_jsonl_lines(src)
    write_jsonl([ex for _, ex in lines], tmp_path / "back.jsonl")
    back = read_jsonl(tmp_path / "back.jsonl")
    assert back == [ex for _, ex in lines]
    orig = {n: json.loads(x)["sentence"] for n, x in enumerate(src.read_text().splitlines(), 1)}
    assert [json.loads(x)["sentence"] for x in (tmp_path / "back.jsonl").read_text().splitlines()] == \
        [orig[n] for n, _ in lines]


def test_bad_lines_name_their_line_number(tmp_path):
    good = (FIX / "random_3_boxes_head.jsonl").read_text().splitlines()[:3]
    for bad, why in [("not json", "Expecting value"), ('{"sample_id": 1}', "no 'sentence'"),
                     ('{"sentence": "Box A contains the cat."}', "not a boxes sentence")]:
        p = tmp_path / "bad.jsonl"
        p.write_text("\n".join(good[:2] + [bad] + good[2:]) + "\n")
        with pytest.raises(DataError, match=r"bad\.jsonl:3: ") as e:
            read_jsonl(p)
        assert why in str(e.value)


def test_data_path_checks_before_any_model(tmp_path):
    from etk.validate import validate

    with pytest.raises(ConfigError, match="does not exist"):
        validate(compose_cfg("patching", tmp_path, COMMON + [f"data.path={tmp_path / 'missing.jsonl'}"]))
    path = five_lines(tmp_path)
    with pytest.raises(ConfigError, match=r"have 3 boxes but data.n_boxes=7; set data.n_boxes=3"):
        validate(compose_cfg("patching", tmp_path, COMMON + [f"data.path={path}", "data.n_boxes=7"]))


def test_lines_with_multi_token_words_are_left_out_with_a_message(tmp_path, capsys):
    write_jsonl(paper_format_lines(6), tmp_path / "six.jsonl")
    lines = (tmp_path / "six.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    odd = rec["sentence"].split(" is in ")[0].split()[-1]
    for i in range(3):  # the whole first context (3 lines) names a word the tokenizer splits
        r = json.loads(lines[i])
        r["sentence"] = r["sentence"].replace(f" {odd} ", " zqxvjwordz ").replace(f" {odd}.", " zqxvjwordz.")
        lines[i] = json.dumps(r)
    p = tmp_path / "odd.jsonl"
    p.write_text("\n".join(lines) + "\n")
    cfg = compose_cfg("patching", tmp_path / "c", COMMON + [f"data.path={p}"])
    exs = task_examples(cfg.data, tiny_tokenizer())
    assert len(exs) == 3
    err = capsys.readouterr().err
    assert "zqxvjwordz" in err and "lines [1, 2, 3]" in err and "etk-tiny-bpe" in err


def test_a_user_objects_file_drops_multi_token_words_with_a_message(tmp_path, capsys):
    words = load_objects()[:10] + ["zqxvjwordz", "qqqwwwzzz"]
    txt = tmp_path / "mine.txt"
    txt.write_text("# my objects\n" + "\n".join(words) + "\n")
    csvf = tmp_path / "mine.csv"
    csvf.write_text("object_name,freq\n" + "\n".join(f"{w},1" for w in words) + "\n")
    assert load_objects(str(txt)) == load_objects(str(csvf)) == words
    doc = run_eval(tmp_path / "run", [f"data.objects={txt}", "data.n_examples=9"])
    assert doc["n"] == 9
    err = capsys.readouterr().err
    assert "2 of 12 words are not one token" in err and "zqxvjwordz" in err and "etk-tiny-bpe" in err
    cfg = compose_cfg("patching", tmp_path / "c", COMMON + [f"data.objects={txt}"])
    prompts = " ".join(ex.render().text for ex in task_examples(cfg.data, tiny_tokenizer()))
    assert "zqxvjwordz" not in prompts and any(w in prompts for w in words[:10])
    few = tmp_path / "few.txt"
    few.write_text("zqxvjwordz\nqqqwwwzzz\n" + load_objects()[0] + "\n")
    with pytest.raises(VocabularyError, match="only 1 of 3 objects are single tokens, 3 needed"):
        run_eval(tmp_path / "run2", [f"data.objects={few}"])
    with pytest.raises(VocabularyError, match="neither a list shipped with etk"):
        load_objects(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("template, expect", [
    ({"relation": "belongs to", "container": "Person", "query": "{container} {label} owns the"},
     "The {o} belongs to Person {l}"),
    ({"container": "Crate", "relation": "sits in", "query": "{container} {label} holds the"},
     "The {o} sits in Crate {l}"),
])
def test_the_readmes_template_examples(tmp_path, template, expect):
    """The two worked examples of the README (a different relation; a different entity word) run as written."""
    override = "data.template={" + ",".join(f"{k}:'{v}'" for k, v in template.items()) + "}"
    doc = run_eval(tmp_path / "run", [override, "data.n_examples=6"])
    assert doc["n"] == 6
    cfg = compose_cfg("patching", tmp_path / "c", COMMON + [override, "data.n_examples=6"])
    ex = task_examples(cfg.data, tiny_tokenizer())[0]
    text = ex.render().text
    c = ex.context
    assert text.startswith(expect.format(o=c.objects[0], l=c.labels[0]))
    assert text.endswith(template["query"].format(container=template["container"], label=c.labels[ex.query]))
