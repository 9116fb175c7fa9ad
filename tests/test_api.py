"""The Python API on models in memory: the same runners as the CLI (identical numbers), typed results, and the
quickstart notebook executed cell by cell."""

import json
import os

import pytest

import etk
from etk.results import EvalResult, FaithfulnessResult, PathPatchingResult
from tests.conftest import ROOT
from tests.helpers import compose_run

QUIET = {"trainer": {"enable_progress_bar": False}}


def test_api_faithfulness_equals_the_cli_on_the_same_config(tmp_path):
    """etk.faithfulness on a model in memory gives exactly the CLI's numbers for the same settings."""
    model = etk.load_model("tiny_planted")
    pp = etk.path_patching(model, out_dir=tmp_path / "pp", n_examples=8, batch_size=8, data={"n_boxes": 2}, **QUIET)
    assert isinstance(pp, PathPatchingResult) and (pp.dir / "circuit.json").exists()
    api = etk.faithfulness(model, pp, out_dir=tmp_path / "api", n_examples=12, batch_size=12, n_random=2,
                           ablation={"n_prompts": 12}, data={"n_boxes": 2}, **QUIET)
    cli = compose_run(tmp_path / "cli", ["method=faithfulness", "model=tiny_planted", f"circuit.path={pp.dir / 'circuit.json'}",
                                         "method.n_examples=12", "method.batch_size=12", "method.n_random=2",
                                         "ablation.n_prompts=12", "data.n_boxes=2", "logger=none",
                                         "trainer.enable_progress_bar=false"])
    assert isinstance(api, FaithfulnessResult) and api.faithfulness is not None
    strip = lambda r: {k: v for k, v in r.to_json().items() if k not in ("resources", "config", "wall_s")}  # noqa: E731
    assert strip(api) == strip(cli)


def test_api_runs_on_the_object_it_was_given(tmp_path):
    """A model changed in memory is the model the run uses (nothing reloaded from its config)."""
    import torch

    model = etk.load_model("tiny")
    before = etk.path_patching(model, out_dir=tmp_path / "a", n_examples=4, batch_size=4, data={"n_boxes": 2}, **QUIET)
    with torch.no_grad():
        for p in model.net.parameters():
            p.mul_(1.5)
    after = etk.path_patching(model, out_dir=tmp_path / "b", n_examples=4, batch_size=4, data={"n_boxes": 2}, **QUIET)
    assert before.circuit != after.circuit or before.stages != after.stages


def test_load_model_from_a_local_folder(tmp_path):
    from etk.models.tiny import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model = etk.load_model(tmp_path / "m", dtype="float32")
    assert model.name == "m" and model.arch.dims.n_layers == 2
    res = etk.api._run("eval", {"model": model}, {"n_examples": 6, "data": {"n_boxes": 2}, **QUIET}, tmp_path / "e")
    assert isinstance(res, EvalResult) and res.n == 6


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    """examples/quickstart.ipynb, every code cell in order in one namespace (as a kernel would run it)."""
    nb = json.loads((ROOT / "examples" / "quickstart.ipynb").read_text())
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            exec(compile(src, f"quickstart.ipynb[{cell['id']}]", "exec"), ns)
    assert os.path.isdir(ns["pp"].dir) and ns["f"].faithfulness is not None
    assert set(ns["cm"].results) >= {"source_alone", "target_alone", "all"}
    assert type(ns["again"]) is FaithfulnessResult and ns["again"].to_json() == ns["f"].to_json()
