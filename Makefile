# The two commands: `make run` and `make test`. Both set everything up first, idempotently.
SHELL := /bin/bash
PYTHON_VERSION ?= 3.11
VENV := .venv
PY := $(VENV)/bin/python
AIRMLOPS := $(PY) -m airmlops.cli
STAMP := $(VENV)/.installed

.PHONY: help setup run stop status test test-unit test-shuffled test-integration test-compose compose-images lint format lock bench bench-scale bench-workers chaos clean replay

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@command -v uv >/dev/null || python3 -m pip install --quiet uv
	@test -x $(PY) || uv venv --quiet --python $(PYTHON_VERSION) $(VENV)
	VIRTUAL_ENV=$(VENV) uv pip install --quiet -r requirements.txt -r requirements-dev.txt
	VIRTUAL_ENV=$(VENV) uv pip install --quiet --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP) ## Create .venv and install the pinned environment

lock: ## Recompile the pinned requirements from requirements*.in
	uv pip compile --quiet --python $(PYTHON_VERSION) requirements.in -o requirements.txt
	uv pip compile --quiet --python $(PYTHON_VERSION) requirements-dev.in -o requirements-dev.txt

lint: setup ## Ruff over the whole repository
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

run: setup ## Start the platform on embedded defaults and trigger the demo training run
	$(AIRMLOPS) platform up --trigger churn_training --wait
	@echo "The demo model answers at http://127.0.0.1:8600/predict, for example:"
	@echo "  curl -s -X POST http://127.0.0.1:8600/predict -H 'Content-Type: application/json' -d '{\"instances\": [{\"customer_id\": \"C000010\", \"tenure_days\": 200}]}'"

stop: ## Stop what `make run` started
	@test -x $(PY) && $(AIRMLOPS) platform down || true

status: setup ## Show which platform processes are alive
	$(AIRMLOPS) platform status

test: setup lint ## Lint, then every test suite (unit, DAG, integration, e2e)
	$(VENV)/bin/pytest tests --durations=40

test-unit: setup
	$(VENV)/bin/pytest tests/unit tests/dags

test-shuffled: setup ## Unit and DAG tests in a random order (SEED=n to repeat one); no test may depend on another's
	$(VENV)/bin/pytest tests/unit tests/dags --shuffle $(or $(SEED),$$RANDOM)

compose-images: ## Build the compose stack's images locally (no registry needed; idempotent)
	bash scripts/ensure-compose.sh

test-compose: setup ## Only the compose stack test (brings the stack up, trains, predicts, tears down)
	$(VENV)/bin/pytest -m compose tests/compose

chaos: setup ## Fault injection under load (kill workers, servers, the proxy, Redis); table in benchmarks/results/chaos.md
	$(VENV)/bin/pytest tests/chaos

bench: setup ## Benchmarks side by side with peers (Feast, mlflow serve, Evidently); results in benchmarks/results/
	$(PY) benchmarks/run_all.py

bench-scale: setup ## Scale curves (100k, 1M, 10M): every benchmarks/bench_scale_*.py in turn; results/scale_*.md, .json, .png
	for f in benchmarks/bench_scale_*.py; do $(PY) $$f || exit 1; done

bench-workers: setup ## Training DAGs at once (1, 4, 8 pipelines) on the compose stack with 1 and 3 Celery workers (long); results/scale_workers.md
	$(PY) benchmarks/bench_scale_workers.py

replay: setup ## Replay simulator traffic to a deployed model (the spec's world; SCENARIO=stable|covariate_drift|concept_drift|covariate_and_concept_drift|data_quality for a what-if)
	$(AIRMLOPS) replay --pipeline $(or $(PIPELINE),churn) $(if $(SCENARIO),--scenario $(SCENARIO)) --rows $(or $(ROWS),2000) --rate $(or $(RATE),20) $(REPLAY_ARGS)

clean: stop ## Remove data and runtime state (keeps .venv)
	rm -rf .data .run
