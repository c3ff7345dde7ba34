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

.PHONY: setup test lint train sweep worker server ui dashboard report export bench data clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(PY) -m ruff check harness tests benchmarks
	$(PY) -m ruff format --check harness tests benchmarks

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
	$(VENV)/bin/optuna-dashboard $(if $(STORAGE),$(subst postgresql://,postgresql+psycopg2://,$(STORAGE)),mlruns/optuna/journal.log) --host $(HOST) --port 8080

# Scale-out (docs/scale-out.md). `make server`: MLflow tracking server on $(HOST):$(PORT) over $BACKEND (a
# PostgreSQL URL, read from the environment so its password never reaches a command line; default: a PostgreSQL of our own in mlruns/postgres on 127.0.0.1:$(PGPORT), which also holds
# the Optuna database), keeping artifacts in ARTIFACTS and serving them to workers.
ARTIFACTS ?= mlruns/server-artifacts
PGPORT ?= 5433
server: setup
	$(PY) -m harness.tracking.server --artifacts '$(ARTIFACTS)' --host $(HOST) --port $(PORT) --pg-port $(PGPORT) $(if $(ALLOWED_HOSTS),--allowed-hosts '$(ALLOWED_HOSTS)') $(if $(ADMIN_PASSWORD_FILE),--admin-password-file '$(ADMIN_PASSWORD_FILE)') $(if $(INSECURE),--insecure)

# `make worker STUDY=quickstart STORAGE=postgresql://... TRACKING=http://host:5000`: joins the study; one worker
# per visible GPU (PER_GPU=2 for two per GPU), one on a CPU-only machine.
worker: setup
	@test -n "$(STORAGE)" && test -n "$(TRACKING)" || { echo "usage: make worker STUDY=quickstart STORAGE=postgresql://user@dbhost:5433/optuna TRACKING=http://host:5000 (docs/scale-out.md)"; exit 2; }
	$(PY) -m harness worker --study studies/$(STUDY).yaml --storage '$(STORAGE)' --tracking-uri '$(TRACKING)' $(if $(PER_GPU),--per-gpu $(PER_GPU)) $(if $(TRIALS),--trials $(TRIALS)) $(if $(GPUS_PER_TRIAL),--gpus-per-trial $(GPUS_PER_TRIAL))

export: setup
	$(PY) -m harness export --study $(STUDY)

ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host $(HOST) --port $(PORT)

data: setup
	PIP='$(PY) -m pip' bash scripts/get-microscopy.sh data
	bash scripts/get-fashion-mnist.sh data

bench: setup
	PY=$(PY) bash benchmarks/run_all.sh

clean-venv:
	rm -rf $(VENV)
