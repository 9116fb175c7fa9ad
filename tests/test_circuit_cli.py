"""Circuit methods through composed configs on the tiny model, and the cross-model matrix multirun."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.helpers import compose_run

CIRCUIT = {"value_fetcher": [[1, 2], [1, 0]], "pos_transmitter": [[0, 1]], "pos_detector": [[0, 3]],
           "struct_reader": [[1, 1]]}
SMALL = ["model=tiny", "logger=none", "data.n_boxes=2", "method.n_examples=12", "method.batch_size=6",
         "ablation.n_prompts=12", "trainer.enable_progress_bar=false"]


@pytest.fixture
def circuit_file(tmp_path):
    p = tmp_path / "circuit.json"
    p.write_text(json.dumps(CIRCUIT))
    return p


@pytest.mark.parametrize("method", ["faithfulness", "completeness", "minimality"])
def test_circuit_methods_compose_and_run(tmp_path, circuit_file, method):
    extra = ["method.n_random=3"] if method != "minimality" else ["method.mode=greedy"]
    compose_run(tmp_path / "run", [f"method={method}", f"circuit.path={circuit_file}"] + SMALL + extra)
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["schema"] == f"etk.{method}/v1" and doc["model"] == "tiny" and doc["evaluations"] > 0
    if method == "minimality":
        pruned = json.loads((tmp_path / "run" / "circuit.json").read_text())
        assert set(pruned) >= {"value_fetcher", "meta"}
        # Counted by hand for CIRCUIT's groups of 1, 1, 1 and 2 heads. Greedy (this run): single drops, n + 1
        # ablations, then 2 per head for the significance test: 3 x (2 + 2) + (3 + 4) = 19. The paper's procedure:
        # every drop of one or two heads, n(n+1)/2, then the same 2 per head: 3 x (1 + 2) + (3 + 4) = 16.
        assert doc["evaluations_done"] == 19 and doc["paper_evaluations"] == 16
        # what ran: each distinct ablation once. Round 1: C and the 5 single drops (C requested 4 times); round 2
        # adds only what round 1 lacks: C minus both VF heads when each is the other's partner, else nothing
        assert doc["evaluations"] == doc["evaluated"] in (6, 7)  # the evaluator's own count of what it ran


def test_unknown_circuit_head_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"value_fetcher": [[9, 0]]}))
    with pytest.raises(ValueError, match=r"unknown head \(9, 0\)"):
        compose_run(tmp_path / "run", ["method=faithfulness", f"circuit.path={p}"] + SMALL)


def test_missing_circuit_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs a circuit"):
        compose_run(tmp_path / "run", ["method=faithfulness", "circuit=none"] + SMALL)


@pytest.mark.slow
def test_cross_model_matrix_multirun(tmp_path, circuit_file):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"value_fetcher": [[0, 0]], "pos_detector": [[1, 3]]}))
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "run_patching.py", "-m", "method=faithfulness", f"circuit.path={circuit_file},{other}",
         "model=tiny,tiny_other", "method.n_random=2", f"hydra.sweep.dir={sweep}"] + SMALL[2:],
        cwd=ROOT, env=dict(os.environ, WANDB_MODE="disabled"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    md = (sweep / "faithfulness_matrix.md").read_text()
    assert "tiny_other" in md and "circuit" in md and "other" in md
    assert (sweep / "faithfulness_matrix.png").exists() and (sweep / "faithfulness_matrix.csv").exists()
    assert "[etk] faithfulness matrix" in out.stdout
