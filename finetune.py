"""Fine-tuning recipe: `python finetune.py model=<name> finetune_data=<boxes|arithmetic> [export=<dir>]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig):
    from etk.runners.finetune import run_finetune

    return run_finetune(cfg)


if __name__ == "__main__":
    main()
