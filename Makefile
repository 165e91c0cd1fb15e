# Each target installs what it needs first, so both work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
# SAM 2.1 builds against the venv's torch, without its CUDA op (pyproject.toml says why).
	$(PY) -m pip install -q setuptools wheel torch torchvision
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation 'sam2>=1.1'
	$(PY) -m pip install -q -e '.[dev]'
# DeepSpeed's CPU communication op is compiled here, not by the first training run.
	$(PY) -m rsrefseg.training.native_ops
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rsrefseg demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow'

bench: $(STAMP)
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs data mlflow.db mlartifacts build
