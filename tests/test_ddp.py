"""Two CPU processes (DDP, gloo) give the one-process results: the whole study on a planted tiny pair (eval, path
patching, minimality, faithfulness, curves, circuit search, DCM, activation patching, CMAP, knockout) and the other
path-patching algorithms and completeness, compared value by value."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TIMING = {"resources", "config", "wall_s", "seconds", "train_seconds", "checkpoint_bytes", "forwards", "trace",
          "evaluations", "evaluations_done", "best_val_accuracy", "mask_last_step"}


def run(tmp, args, devices):
    dist = ["trainer.accelerator=cpu", f"trainer.devices={devices}", f"trainer.strategy={'ddp' if devices > 1 else 'auto'}"]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "run_patching.py"), *args, *dist, f"hydra.run.dir={tmp}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return tmp


def leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            if k not in TIMING and not k.endswith("_s"):
                yield from leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def assert_same_results(a, b):
    files = sorted(p.relative_to(a) for p in a.rglob("results.json"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("results.json"))
    for f in files:
        x, y = dict(leaves(json.loads((a / f).read_text()))), dict(leaves(json.loads((b / f).read_text())))
        assert x.keys() == y.keys(), f
        for k in x:
            if isinstance(x[k], float) and isinstance(y[k], float):
                assert math.isclose(x[k], y[k], rel_tol=1e-6, abs_tol=1e-6), (f, k, x[k], y[k])
            elif isinstance(x[k], str) and isinstance(y[k], str):  # paths name their own run folder
                assert x[k].replace(str(a), "<run>") == y[k].replace(str(b), "<run>"), (f, k, x[k], y[k])
            else:
                assert x[k] == y[k], (f, k, x[k], y[k])
    return files


STUDY = ["method=study", "pair=tiny_planted", "data.n_boxes=3", "data.n_examples=21", "logger=none",
         "trainer.enable_progress_bar=false", "method.eval.box_counts=[3]", "method.eval.n_examples=21",
         "method.path_patching.n_examples=9", "method.path_patching.batch_size=4", "method.minimality.n_examples=9",
         "method.minimality.batch_size=4", "method.faithfulness.n_examples=9", "method.faithfulness.batch_size=4",
         "method.faithfulness.n_random=2", "method.faithfulness_curve.n_examples=9", "method.faithfulness_curve.batch_size=4",
         "method.circuit_search.n_search=9", "method.circuit_search.n_heldout=9", "method.circuit_search.batch_size=4",
         "method.circuit_search.attribution_batch_size=4", "method.ablation_prompts=9",
         "method.plan.dcm_groups=[value_fetcher]", "method.plan.dcm_desiderata=[object,position]", "method.dcm.n_train=16",
         "method.dcm.n_eval=8", "method.dcm.n_test=9", "method.dcm.batch_size=4", "method.activation_patching.n_examples=9",
         "method.activation_patching.batch_size=4", "method.activation_patching.repeats=1", "method.cmap.n_examples=9",
         "method.cmap.batch_size=4", "method.knockout.n_examples=9", "method.knockout.batch_size=4",
         "method.model_diff.n_examples=9", "method.model_diff.batch_size=4", "method.completeness.n_examples=9",
         "method.completeness.batch_size=4", "method.completeness.n_random=2", "method.attention_patterns.n_examples=9",
         "method.attention_patterns.batch_size=4", "method.plan.split_dcm=[[value_fetcher,object]]",
         "method.positional_hypotheses.n_examples=9", "method.positional_hypotheses.batch_size=9"]


@pytest.mark.slow
def test_the_study_on_two_processes_equals_one(tmp_path):
    one, two = run(tmp_path / "one", STUDY, 1), run(tmp_path / "two", STUDY, 2)
    files = assert_same_results(one, two)
    steps = {f.parts[0] for f in files}
    assert steps == {"eval", "path_patching", "minimality", "faithfulness", "faithfulness_curve", "circuit_search", "dcm",
                     "activation_patching", "cmap", "model_diff", "knockout", "completeness", "attention_patterns",
                     "causal_impact"}
    doc = json.loads((two / "eval" / "base" / "results.json").read_text())
    assert doc["resources"]["world_size"] == 2 and 0 < doc["accuracy"] < 1  # non-trivial numbers were compared


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["method=path_patching", "method.algorithm=naive"],
    ["method=path_patching", "method.algorithm=attribution"],
    ["method=completeness", "circuit=tiny_fixture", "method.n_random=3"],
], ids=["naive", "attribution", "completeness"])
def test_other_methods_on_two_processes_equal_one(tmp_path, args):
    common = ["model=tiny_planted", "data.n_boxes=3", "logger=none", "trainer.enable_progress_bar=false",
              "method.n_examples=9", "method.batch_size=4", "ablation.n_prompts=9"]
    assert_same_results(run(tmp_path / "one", args + common, 1), run(tmp_path / "two", args + common, 2))


def test_no_code_reads_rank_local_state_directly():
    """The guard: per-example metric states and path-patching sums are rank-local under DDP, so only the gathering
    methods (`ExampleMetric.gathered`, `PathPatchingModule.scores`) may read them; any other read of one of those
    attributes anywhere in etk fails here, naming the line."""
    import ast
    import inspect

    import etk
    from etk.methods.mean_ablation.module import AblationAccuracy
    from etk.metrics import ExampleMetric, TaskAccuracy

    states = set()
    for cls in (TaskAccuracy, AblationAccuracy):
        states |= set(cls()._defaults)
    assert {"index", "correct", "logp"} <= states
    local = states | {"sums"}
    allowed_classes = {c.__name__ for c in (ExampleMetric, TaskAccuracy, AblationAccuracy)}
    allowed_functions = {"scores", "predict_step", "__init__"}  # PathPatchingModule: write, reset, all_sum read
    root = os.path.dirname(inspect.getfile(etk))
    bad = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            tree = ast.parse(open(path).read())
            calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}  # x.logp() is a method, not state

            def visit(node, owner_class=None, owner_fn=None):
                for child in ast.iter_child_nodes(node):
                    cls = child.name if isinstance(child, ast.ClassDef) else owner_class
                    fn = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else owner_fn
                    if isinstance(child, ast.Attribute) and child.attr in local and id(child) not in calls:
                        ok = owner_class in allowed_classes or (child.attr == "sums" and owner_fn in allowed_functions)
                        if not ok and not (child.attr == "index" and not _is_metric_read(child)):
                            bad.append(f"{os.path.relpath(path, root)}:{child.lineno} .{child.attr}")
                    visit(child, cls, fn)

            visit(tree)
    assert not bad, "rank-local state read outside the gathering methods: " + ", ".join(bad)


def _is_metric_read(node) -> bool:
    """`x.acc.index`-like reads (a metric's state) as opposed to `batch.index` / `batch.base.index` (batch data)."""
    import ast

    v = node.value
    return isinstance(v, ast.Attribute) and v.attr in {"acc", "val_acc", "test_acc", "test_floor", "metric"}
