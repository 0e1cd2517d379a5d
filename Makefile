# Thin wrappers; the real work lives in src/gpt2lab, stages/ and dvc.yaml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
# Stage commands say `python`: make it the project's interpreter.
export PATH := $(CURDIR)/$(BIN):$(PATH)
UI_PORT ?= 5000
# A team's tracking server (make server): PostgreSQL backend store, artifacts proxied by the server.
DATABASE_URL ?= postgresql+psycopg2://mlflow@localhost:5432/mlflow
SERVER_HOST ?= 0.0.0.0
SERVER_PORT ?= 5000
SERVER_ARTIFACTS ?= $(CURDIR)/mlartifacts-server
SERVER_WORKERS ?= 2

.PHONY: setup test repro smoke bench ui server

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

test: setup
	$(BIN)/python -m pytest

repro: setup
	$(BIN)/dvc repro

# Benchmarks against the peers (transformers, peft, CTranslate2, ONNX Runtime), side by side;
# tables of medians and ratios. The inference engines come from the bench extra.
bench: setup
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/bucketing.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/classify.py
	$(BIN)/python bench/serve.py

# The whole DAG offline as a DVC experiment (params-smoke.yaml over params.yaml, in a temporary
# copy: the workspace's params.yaml and dvc.lock stay as they are). E.g. ARGS="-n my-smoke -S lora.rank=4".
smoke: setup
	$(BIN)/gpt2lab smoke $(ARGS)

# MLflow UI over the local store, light: one worker, no job runner. Ctrl-C stops it.
ui: setup
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT) (the gpt2lab experiment opens on its runs; Ctrl-C stops it)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --workers 1 --host 127.0.0.1 --port $(UI_PORT) \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow.db --artifacts-destination $(CURDIR)/mlartifacts

# One MLflow tracking server for a team: runs, metrics and the Model Registry in PostgreSQL, artifacts
# (models, plots) stored by the server under SERVER_ARTIFACTS and proxied to clients, who set only
# MLFLOW_TRACKING_URI=http://<host>:$(SERVER_PORT). E.g.
#   make server DATABASE_URL=postgresql+psycopg2://mlflow:secret@db.example.org:5432/mlflow SERVER_ARTIFACTS=/srv/mlflow
server: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --workers $(SERVER_WORKERS) \
		--host $(SERVER_HOST) --port $(SERVER_PORT) --backend-store-uri '$(DATABASE_URL)' \
		--artifacts-destination $(SERVER_ARTIFACTS) --allowed-hosts '*'
