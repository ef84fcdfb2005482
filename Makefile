# `make demo` and `make test` each do the whole set-up on a fresh clone: a .venv, CPU torch, ckptkd with dev extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pinned exactly here (pyproject asks only for torch>=2.13,<3) so these machines take the local CPU wheel
# instead of resolving a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
# The suite runs in this many pytest-xdist processes (its tests set torch to one thread each); 2 keeps it under
# 12 minutes on a 2-core machine.
TEST_WORKERS ?= 2

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/ckptkd demo --out studies/demo

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
