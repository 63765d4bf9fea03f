# The two commands of the README. Both set up .venv first (scripts/setup.sh is idempotent).
PY := .venv/bin/python
export TORCHDYNAMO_DISABLE ?= 1

.PHONY: setup demo test bench
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m integration.demo $(ARGS)

test: setup
	$(PY) -m pytest -n 2 --timeout=600 tests

bench: setup
	$(PY) -m bench $(ARGS)
