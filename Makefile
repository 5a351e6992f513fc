# make demo   — set up .venv and train the tiny preset through Ray Train + DeepSpeed, tracked in ./mlflow.db
# make test   — set up .venv and run the test suite
# Setup is idempotent: .venv/.installed is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export OMP_NUM_THREADS ?= 1
export RAY_AUTH_MODE ?= token
# DeepSpeed JIT-builds its CPU comm op once per venv here (a shared cache rebuilds when venvs alternate)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup demo test test-fast ui clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/alignprop train --config tiny-cpu

test: setup
	$(PY) -m pytest -q -ra --durations=10 tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" tests

ui: setup
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

clean:
	rm -rf $(VENV) mlflow.db mlartifacts mlruns .pytest_cache
