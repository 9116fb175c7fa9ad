"""`run_patching.py method=eval`: through the real CLI, and composed in-process for each logger."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.helpers import compose_run


@pytest.mark.parametrize("logger", ["csv", "wandb", "none"])
def test_eval_composed_with_each_logger(tmp_path, logger):
    res = compose_run(tmp_path, ["model=tiny", f"logger={logger}", "data.n_examples=12", "data.n_boxes=3",
                                 "trainer.enable_progress_bar=false"])
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["schema"] == "etk.eval/v1"
    assert doc["n"] == 12 and 0 <= doc["ci_low"] <= doc["accuracy"] <= doc["ci_high"] <= 1
    assert doc["config"]["model"]["name"] == "tiny" and "hydra" not in doc["config"]
    assert res.accuracy == doc["accuracy"]
    if logger == "csv":
        assert (tmp_path / "csv" / "metrics.csv").exists()


def test_eval_box_counts_table(tmp_path):
    res = compose_run(tmp_path, ["model=tiny", "logger=none", "data.n_examples=6", "method.box_counts=[2,3]",
                                 "data.n_boxes=3", "trainer.enable_progress_bar=false"])
    assert [r["n_boxes"] for r in res.by_n_boxes] == [2, 3]
    assert res.n_boxes == 3


@pytest.mark.slow
def test_eval_through_real_cli(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled")
    out = subprocess.run(
        [sys.executable, "run_patching.py", "method=eval", "model=tiny", "data.n_examples=14",
         f"hydra.run.dir={tmp_path}", "trainer.enable_progress_bar=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[etk] tiny n_boxes=7: accuracy=" in out.stdout
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {"accuracy", "ci_low", "ci_high", "n", "config"} <= set(doc) and doc["n"] == 14
