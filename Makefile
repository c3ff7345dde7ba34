# kd-harness. Every target installs what it needs on first use (a .venv pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

STUDY ?= quickstart
EXP ?= teachers/unet16_digits
MLFLOW_TRACKING_URI ?= sqlite:///mlruns/mlflow.db
export MLFLOW_TRACKING_URI
HOST ?= 127.0.0.1
PORT ?= 5000

SWEEP_ARGS = --study studies/$(STUDY).yaml $(if $(TRIALS),--trials $(TRIALS)) $(if $(WORKERS),--workers $(WORKERS)) $(if $(STORAGE),--storage $(STORAGE))

.PHONY: setup test lint train sweep worker server ui dashboard report bench data clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(PY) -m ruff check harness tests benchmarks

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

train: setup
	$(PY) -m harness train --config experiments/$(EXP).yaml

sweep: setup
	$(PY) -m harness sweep $(SWEEP_ARGS)

REPORT ?= all
report: setup
	$(PY) -m harness.report --study $(REPORT)

dashboard: setup
	$(VENV)/bin/optuna-dashboard $(if $(STORAGE),$(STORAGE),mlruns/optuna/journal.log) --host $(HOST) --port 8080

ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host $(HOST) --port $(PORT)

data:
	bash scripts/get-fashion-mnist.sh data

bench: setup
	$(PY) -m harness bench

clean-venv:
	rm -rf $(VENV)
