"""Fine-tuning recipe: `python finetune.py model=<name> finetune_data=<boxes|relations|arithmetic>` (= `etk-finetune`)."""

from etk.cli import finetune

if __name__ == "__main__":
    finetune()
