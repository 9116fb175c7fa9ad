"""Entry points (console scripts `etk-patching`, `etk-train-dcm`, `etk-finetune`; the top-level `run_patching.py`,
`train_dcm.py`, `finetune.py` are thin aliases). Configs come from the package (`etk.conf`: the top-level `conf/`, linked into the package and shipped in the wheel), so they work from any
folder and from an installed wheel. Every config is validated before a model is loaded; user errors print one
paragraph and exit with status 2."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from etk.errors import report_user_errors


def run_method(cfg: DictConfig):
    """Dispatch a composed `patching` config to its method: the study (`etk.study`) or a registered method."""
    from etk.methods.registry import STUDY_METHODS, get

    if cfg.method.name == "study_tasks":
        from etk.study.tasks import run_study_tasks

        return run_study_tasks(cfg)
    if cfg.method.name in STUDY_METHODS:
        from etk.study.run import run_study

        return run_study(cfg)
    return get(cfg.method.name).run(cfg)


@report_user_errors
def _patching(cfg: DictConfig):
    from etk.runtime import quiet_dependencies
    from etk.validate import validate

    quiet_dependencies()
    validate(cfg)
    return run_method(cfg)


@report_user_errors
def _train_dcm(cfg: DictConfig):
    from etk.methods.dcm.run import run_dcm
    from etk.runtime import quiet_dependencies
    from etk.validate import validate

    quiet_dependencies()
    validate(cfg)
    return run_dcm(cfg)


@report_user_errors
def _finetune(cfg: DictConfig):
    from etk.methods.finetune.run import run_finetune
    from etk.runtime import quiet_dependencies
    from etk.validate import validate

    quiet_dependencies()
    validate(cfg)
    return run_finetune(cfg)


patching = hydra.main(version_base="1.3", config_path="conf", config_name="patching")(_patching)
train_dcm = hydra.main(version_base="1.3", config_path="conf", config_name="dcm")(_train_dcm)
finetune = hydra.main(version_base="1.3", config_path="conf", config_name="finetune")(_finetune)
