"""Evaluation and patching experiments: `python run_patching.py method=<eval|...> model=<name>`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="patching")
def main(cfg: DictConfig):
    from etk.runners.patching import run

    return run(cfg)


if __name__ == "__main__":
    main()
