# make demo   — set up .venv and align the pretrained toy-world pipeline to its count reward (toy-count) through Ray Train + DeepSpeed, tracked in ./mlflow.db
# make test   — set up .venv and run the test suite
# make gpu-check — on a GPU machine: the GPU tests + the SD1.5-size bench, one table in gpu-check/ (≤ 8 min on one H100)
# Setup is idempotent: .venv/.installed is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# torch build, a PyTorch wheel index tag: cpu unless `nvidia-smi -L` lists a GPU (PyPI's Linux torch
# is the ~3 GB CUDA 13 build), cu126 if it does (the CUDA build of cluster/torch-build.env: NVIDIA
# driver >= 560), pypi for PyPI's own wheel (macOS has no +cpu wheel). To switch an existing venv:
# rm .venv/.installed; make setup TORCH_BUILD=cpu
TORCH_BUILD ?= $(if $(filter Darwin,$(shell uname -s)),pypi,$(if $(shell nvidia-smi -L 2>/dev/null | grep '^GPU '),cu126,cpu))
# --retries 1: a PyTorch index out of reach (offline mirrors, firewalls) costs seconds, not minutes
TORCH_PIP = $(if $(filter pypi,$(TORCH_BUILD)),"torch==$(TORCH_VERSION)","torch==$(TORCH_VERSION)+$(TORCH_BUILD)" \
	--extra-index-url https://download.pytorch.org/whl/$(TORCH_BUILD) --retries 1 --timeout 30)
UI_PORT ?= 5000
UI_STORE ?= sqlite:///$(CURDIR)/mlflow.db
export OMP_NUM_THREADS ?= 1
export RAY_AUTH_MODE ?= token
# DeepSpeed JIT-builds its CPU comm op once per venv here (a shared cache rebuilds when venvs alternate)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup demo test test-fast gpu-check ui clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to its build: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install -q $(TORCH_PIP)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/alignprop train --config toy-count

test: setup
	$(PY) -m pytest -q -ra --durations=10 tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" tests

gpu-check: setup
	$(PY) -m alignprop.platform.bench.gpu_check --out gpu-check

# make ui [UI_PORT=5000] [UI_STORE=sqlite:///abs/mlflow.db]: stops (server included) on Ctrl-C or SIGTERM
ui: setup
	exec $(VENV)/bin/alignprop ui --port $(UI_PORT) --tracking-uri $(UI_STORE)

clean:
	rm -rf $(VENV) mlflow.db mlartifacts mlruns .pytest_cache gpu-check
