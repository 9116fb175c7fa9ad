"""Evaluation and patching experiments: `python run_patching.py method=<eval|...> model=<name>` (= `etk-patching`)."""

from etk.cli import patching

if __name__ == "__main__":
    patching()
