"""Every method x pair x desideratum config composes, resolves and passes validation; every method config names a
registered method, and every registered method with a study step is a valid study step."""


import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from etk.methods.registry import REGISTRY, get
from etk.validate import validate
from tests.conftest import CONF

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
PAIRS = sorted(p.stem for p in (CONF / "pair").glob("*.yaml"))
DESIDERATA = sorted(p.stem for p in (CONF / "desideratum").glob("*.yaml"))


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


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_pair_composes(method, pair):
    cfg, resolved = composed("patching", [f"method={method}", f"pair={pair}", "model=base"])
    assert get(cfg.method.name) is not None
    assert resolved["model"]["name"] == resolved["pair"]["base"]["name"]


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("desideratum", DESIDERATA)
def test_every_desideratum_and_pair_composes_for_dcm(desideratum, pair):
    cfg, resolved = composed("dcm", [f"desideratum={desideratum}", f"pair={pair}", "model=finetuned"])
    assert resolved["desideratum"]["name"] and resolved["model"]["name"] == resolved["pair"]["finetuned"]["name"]


@pytest.mark.parametrize("pair", PAIRS)
def test_finetune_composes_for_every_pair(pair):
    composed("finetune", [f"pair={pair}"])


def test_study_steps_are_registered_methods_with_study_jobs():
    for study in ("study", "study_paper"):
        cfg, _ = composed("patching", [f"method={study}"])
        for step in cfg.method.steps:
            assert REGISTRY[step].study is not None, step
    assert {p.stem for p in (CONF / "method").glob("*.yaml")} - {"study_paper"} <= set(REGISTRY)
