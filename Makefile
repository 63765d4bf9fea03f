# The two commands of the README. Both set up .venv first (scripts/setup.sh is idempotent).
PY := .venv/bin/python
export TORCHDYNAMO_DISABLE ?= 1

.PHONY: setup demo test test-gpu bench
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m integration.demo $(ARGS)

test: setup
	$(PY) -m pytest -n 2 --timeout=600 --durations=25 tests

# The multi-rank tests (marked `multirank` by tests/conftest.py) on NCCL, one GPU per rank;
# serial, since each test takes several GPUs. Tests needing more GPUs than visible are skipped.
test-gpu: setup
	MEGASEEK_TEST_BACKEND=nccl $(PY) -m pytest -m multirank --timeout=900 -rs tests $(ARGS)

bench: setup
	$(PY) -m bench $(ARGS)
