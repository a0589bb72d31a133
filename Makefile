# The two commands of the README: `make run` (the default pipeline) and `make test` (the test suite).
# Both install into .venv on first use. Pass Hydra overrides with ARGS, e.g. make run ARGS="algo=ppo".
PY := .venv/bin/python
ARGS ?=

.PHONY: run test install deploy ui docs clean

.venv/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

# Debian's Chromium for the MLflow UI test (skipped, with its reason, where it cannot be installed).
.venv/.browser: scripts/install_browser.sh | .venv/.installed
	bash scripts/install_browser.sh
	touch $@

# vLLM's CPU build for the rollout-engine tests (they skip, saying why, where it cannot be installed).
.venv/.vllm: scripts/install_vllm.sh pyproject.toml | .venv/.installed
	bash scripts/install_vllm.sh
	touch $@

install: .venv/.installed

run: .venv/.installed
	$(PY) -m flows.pipeline $(ARGS)

# Work pools, tag concurrency limit and deployments on the Prefect server at $$PREFECT_API_URL (README).
deploy: .venv/.installed
	$(PY) -m flows.deploy $(ARGS)

# The MLflow UI over the local store (paths.root: $$RLHF_HOME or .rlhf), on the runs table (every run prints its link too).
# One worker and no job runner (GenAI jobs): a page for one person, up in about 12 s here instead of 26.
RLHF_HOME ?= .rlhf
UI_PORT ?= 5000
ui: .venv/.installed
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)/#/experiments/1?workflowType=machine_learning"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui --backend-store-uri sqlite:///$(abspath $(RLHF_HOME))/mlflow.db \
		--port $(UI_PORT) --workers 1

# Formatting and lint first (ruff: pyproject.toml), then the suite, which also builds the docs with --strict.
# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: .venv/.installed .venv/.browser .venv/.vllm
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
	@$(PY) -m pytest $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The documentation site, served with live reload at http://127.0.0.1:8000 (built with --strict by the tests).
docs: .venv/.installed
	.venv/bin/mkdocs serve

clean:
	rm -rf .rlhf
