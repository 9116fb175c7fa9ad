"""DCM: `python train_dcm.py model=<m> circuit=<c> group=<g> desideratum=<object|label|position>`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="dcm")
def main(cfg: DictConfig):
    from etk.runners.dcm import run_dcm

    return run_dcm(cfg)


if __name__ == "__main__":
    main()
