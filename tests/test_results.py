"""Typed results: every registered method's result type round-trips through save/load (fields and the rest of its
record), is found by its schema, and bad files fail with a DataError naming the file. The layout keeps modules
configured at construction: no code outside a LightningModule's class assigns its attributes."""

import ast
import json
import typing
from dataclasses import fields
from pathlib import Path

import pytest

import etk
from etk.errors import DataError
from etk.methods.registry import REGISTRY
from etk.results import RESULT_TYPES, Result, load_result


def sample(tp) -> object:
    """A value of a field's annotated type (for a synthetic record)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return sample(next(a for a in typing.get_args(tp) if a is not type(None)))
    if tp is str:
        return "s"
    if tp is bool:
        return True
    if tp is int:
        return 3
    if tp is float:
        return 0.25
    if origin is list or tp is list:
        return [[1, 2]]
    return {"accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 10}  # dicts and TypedDicts


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_result_round_trips(name, tmp_path):
    cls = REGISTRY[name].result
    assert RESULT_TYPES[cls.schema] is cls and cls.method == name
    hints = typing.get_type_hints(cls)
    payload = {f.name: sample(hints[f.name]) for f in fields(cls) if f.name not in ("extra", "config", "resources")}
    payload.update({"something_else": {"kept": [1, 2]}, "config": {"seed": 0}})
    res = cls.from_payload(payload)
    assert res.extra == {"something_else": {"kept": [1, 2]}}
    res.save(tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["schema"] == cls.schema and doc["something_else"] == {"kept": [1, 2]}
    back = cls.load(tmp_path)
    assert type(back) is cls and back.to_json() == res.to_json() and back.dir == tmp_path
    assert type(load_result(tmp_path)) is cls and load_result(tmp_path / "results.json").to_json() == res.to_json()


def test_bad_result_files_fail_with_the_file_named(tmp_path):
    from etk.results import EvalResult

    with pytest.raises(DataError, match="no results.json"):
        EvalResult.load(tmp_path)
    (tmp_path / "results.json").write_text('{"schema": "etk.dcm/v1"}')
    with pytest.raises(DataError, match="expected schema 'etk.eval/v1'"):
        EvalResult.load(tmp_path)
    (tmp_path / "results.json").write_text('{"schema": "etk.eval/v1", "model": "m"}')
    with pytest.raises(DataError, match="needs"):  # required fields missing: not a finished eval record
        EvalResult.load(tmp_path)
    (tmp_path / "results.json").write_text('{"schema": "etk.unknown/v9"}')
    with pytest.raises(DataError, match="unknown schema"):
        load_result(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_result(tmp_path)


def test_omitted_fields_stay_absent(tmp_path):
    """Optional fields a method does not set are not written (the record keeps the runner's keys exactly)."""
    from etk.results import FaithfulnessResult

    hints = typing.get_type_hints(FaithfulnessResult)
    payload = {f.name: sample(hints[f.name]) for f in fields(FaithfulnessResult) if f.default is not None
               and f.name not in ("extra", "config", "resources")}
    doc = FaithfulnessResult.from_payload({**payload, "circuit": "c"}).to_json()
    assert "reason" not in doc and "circuit_spec" not in doc and doc["circuit"] == "c"


def test_api_is_exported():
    assert {"load_model", "path_patching", "faithfulness", "dcm", "cmap", "circuit_search", "model_diff", "knockout",
            "load_result"} <= set(dir(etk))
    assert etk.load_result is load_result


MODULE_STATE = {"net", "tokenizer", "pair", "head_sets", "ablations", "mode", "means", "stage", "receivers", "senders",
                "current", "model_cfg"}


def test_no_lightning_module_attribute_is_assigned_outside_its_class():
    """Modules are configured at construction (or through their one documented per-loop method): nothing outside
    a class body assigns the state a module computes with (`x.head_sets = ...`, `mod.net, mod.tokenizer = ...`)."""
    root = Path(etk.__file__).parent
    bad = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Assign, ast.AugAssign)):
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            flat = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
            for t in flat:
                if (isinstance(t, ast.Attribute) and t.attr in MODULE_STATE and isinstance(t.value, ast.Name)
                        and t.value.id != "self"):
                    bad.append(f"{path.relative_to(root)}:{node.lineno} {t.value.id}.{t.attr}")
    assert not bad, "module state assigned from outside its class: " + ", ".join(bad)


def test_methods_never_import_the_study():
    """The study imports the methods (explicitly, through the registry); no method module imports the study."""
    root = Path(etk.__file__).parent / "methods"
    offenders = []
    for p in root.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{p.relative_to(root)}: {n}" for n in names if n.startswith("etk.study")]
    assert not offenders, offenders


def test_result_base_declares_the_common_fields():
    assert [f.name for f in fields(Result)] == ["config", "resources", "extra"]


def test_every_result_logs_scalars_tables_and_figures_the_same_way(tmp_path):
    """`Result.log` sends the headline numbers, each table and each figure file to a logger that takes them (W&B's
    log_table / log_image), and only the scalars to one that does not (CSV)."""
    from etk.results import KnockoutResult

    res = KnockoutResult(model="m", baseline={"accuracy": 0.75, "ci_low": 0.5, "ci_high": 0.9, "n": 8},
                         edges={"last->query_label": {"start_layer": [0, 1], "accuracy": [0.25, 0.75],
                                                      "ci_low": [0.1, 0.5], "ci_high": [0.5, 0.9]}})
    res.save(tmp_path)
    (tmp_path / "knockout.png").write_bytes(b"\x89PNG")

    class Rich:
        def __init__(self):
            self.calls = []

        def log_metrics(self, m):
            self.calls.append(("metrics", m))

        def log_table(self, key, columns, data):
            self.calls.append(("table", key, columns, data))

        def log_image(self, key, images):
            self.calls.append(("image", key, images))

    class Plain:
        def __init__(self):
            self.calls = []

        def log_metrics(self, m):
            self.calls.append(("metrics", m))

    rich, plain = Rich(), Plain()
    res.log(rich)
    res.log(plain)
    assert ("metrics", {"knockout/baseline": 0.75}) in rich.calls and plain.calls == [("metrics", {"knockout/baseline": 0.75})]
    table = next(c for c in rich.calls if c[0] == "table")
    assert table[1] == "knockout/knockout" and table[3] == [["last->query_label", 0, 0.25, 0.1, 0.5],
                                                            ["last->query_label", 1, 0.75, 0.5, 0.9]]
    assert ("image", "knockout/knockout", [str(tmp_path / "knockout.png")]) in rich.calls
