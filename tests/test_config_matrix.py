"""Every method x pair x desideratum config composes, resolves and passes validation, with values in range; every
method config names a registered method, and every registered method with a study step is a valid study step.

One test per method (per desideratum for DCM) loops over the pairs: a failure names the pair it failed on."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from etk.methods.registry import REGISTRY, STUDY_METHODS, get
from etk.study.plan import STEP_JOBS
from etk.tasks import TASKS
from etk.validate import validate
from tests.conftest import CONF

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
PAIRS = sorted(p.stem for p in (CONF / "pair").glob("*.yaml"))
DESIDERATA = sorted(p.stem for p in (CONF / "desideratum").glob("*.yaml"))
COUNTS = {"n_examples", "batch_size", "n_train", "n_eval", "n_test", "epochs", "steps"}  # integers >= 1 where set
GROUPS = {"value_fetcher", "pos_transmitter", "pos_detector", "struct_reader"}
DESIDERATUM_NAMES = {d.name for t in TASKS.values() for d in t.desiderata}  # every registered task's


@pytest.fixture(scope="module", autouse=True)
def hydra_once():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        yield


def composed(primary, overrides):
    cfg = compose(primary, overrides=overrides)
    c = OmegaConf.to_container(cfg, resolve=False)
    c.pop("logger", None)  # its save_dir is ${hydra:runtime.output_dir}, set only by a running Hydra job
    resolved = OmegaConf.to_container(OmegaConf.create(c), resolve=True)  # every other interpolation resolves
    validate(cfg)
    return cfg, resolved


def counts_in(node, path=""):
    """(dotted path, value) of every count key (COUNTS) anywhere under a resolved config section (a list is a value
    of its own: the study's `steps` is a list of step names, not a count)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from counts_in(v, f"{path}.{k}")
            elif k in COUNTS and not isinstance(v, list):
                yield f"{path}.{k}", v


def assert_counts_positive(resolved, *sections):
    for section in sections:
        for path, v in counts_in(resolved.get(section) or {}, section):
            assert v is None or (type(v) is int and v >= 1), (path, v)


def assert_boxes_in_range(resolved):
    n = resolved["data"]["n_boxes"]
    assert type(n) is int and 2 <= n <= 26, n  # one-letter box labels A-Z; at least two boxes to tell apart


@pytest.mark.parametrize("method", METHODS)
def test_every_method_composes_for_every_pair(method):
    for pair in PAIRS:
        cfg, resolved = composed("patching", [f"method={method}", f"pair={pair}", "model=base"])
        name = cfg.method.name
        assert name in REGISTRY or name in STUDY_METHODS, (pair, name)
        if name not in STUDY_METHODS:
            assert get(name).name == name, (pair, name)
            assert get(name).entry == "patching", (pair, name)  # it runs under the primary config it composed in
        assert_counts_positive(resolved, "method", "data")
        assert_boxes_in_range(resolved)
        assert resolved["model"]["name"] == resolved["pair"]["base"]["name"], pair
        assert resolved["pair"]["base"]["name"] and resolved["pair"]["finetuned"]["name"], pair


@pytest.mark.parametrize("desideratum", DESIDERATA)
def test_every_desideratum_composes_for_dcm_with_every_pair(desideratum):
    for pair in PAIRS:
        cfg, resolved = composed("dcm", [f"desideratum={desideratum}", f"pair={pair}", "model=finetuned"])
        assert resolved["desideratum"]["name"] in DESIDERATUM_NAMES, (pair, resolved["desideratum"]["name"])
        assert resolved["group"] in GROUPS, (pair, resolved["group"])
        assert_counts_positive(resolved, "dcm", "data")
        assert_boxes_in_range(resolved)
        assert resolved["model"]["name"] == resolved["pair"]["finetuned"]["name"], pair


def test_finetune_composes_for_every_pair():
    for pair in PAIRS:
        for member in ([], ["model=base"]):
            cfg, resolved = composed("finetune", [f"pair={pair}", *member])
            assert_counts_positive(resolved, "train", "eval", "data")
            assert_boxes_in_range(resolved)
            fd = resolved["finetune_data"]
            assert 2 <= fd["min_boxes"] <= fd["max_boxes"] <= 26, (pair, fd)
            # the evaluation prompts follow eval.*
            assert resolved["data"]["n_examples"] == resolved["eval"]["n_examples"], pair
            if member:
                assert resolved["model"]["name"] == resolved["pair"]["base"]["name"], pair


def test_study_steps_are_registered_methods_with_study_jobs():
    for study in ("study", "study_paper"):
        cfg, _ = composed("patching", [f"method={study}"])
        for step in cfg.method.steps:
            assert step in REGISTRY and step in STEP_JOBS, step
    assert {p.stem for p in (CONF / "method").glob("*.yaml")} - set(STUDY_METHODS) <= set(REGISTRY)


def test_study_paper_plans_the_four_model_matrix_and_the_eleven_variants(tmp_path, monkeypatch):
    """study_paper's activation patching: the paper's 4 models (each skipped with a note where its weights are
    absent, as here) and the 11 positional variants for the positional head sets."""
    from etk.study.run import Study
    from etk.tasks.entity_tracking.pairs import POSITIONAL_VARIANTS

    monkeypatch.delenv("ETK_MODEL_ROOT", raising=False)
    cfg, _ = composed("patching", ["method=study_paper", "pair=tiny"])
    plan = cfg.method.plan
    assert list(plan.ap_models) == ["llama_7b", "vicuna_7b", "goat_7b", "float_7b"]
    assert sorted(plan.ap_variants.position) == sorted(POSITIONAL_VARIANTS) and len(POSITIONAL_VARIANTS) == 11
    study = Study(cfg, tmp_path, [])
    assert study.available_models([*plan.ap_models, "tiny"], "activation_patching") == ["tiny"]
    assert [line.split(":")[1].strip() for line in study.log] == [f"model {m} skipped" for m in plan.ap_models]
