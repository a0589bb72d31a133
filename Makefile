# The two commands of the README: `make run` (the default pipeline) and `make test` (the test suite).
# Both install into .venv on first use. Pass Hydra overrides with ARGS, e.g. make run ARGS="algo=ppo".
PY := .venv/bin/python
ARGS ?=

.PHONY: run test install deploy clean

.venv/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

install: .venv/.installed

run: .venv/.installed
	$(PY) -m flows.pipeline $(ARGS)

# Work pools, tag concurrency limit and deployments on the Prefect server at $$PREFECT_API_URL (README).
deploy: .venv/.installed
	$(PY) -m flows.deploy $(ARGS)

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: .venv/.installed
	@$(PY) -m pytest $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf .rlhf
