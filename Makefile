# The two commands of the README: `make demo` and `make test`. Both create or reuse .venv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ENV := source scripts/env.sh &&

.PHONY: setup demo test test-all lint bench soak clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(ENV) $(PY) -m rlhf +experiment=tiny_grpo_demo run.output_dir=outputs/demo $(ARGS)

# WORKERS=N runs the tests on N pytest-xdist workers (each file's tests on one worker, the longest files first:
# tests/conftest.py); WORKERS=0 runs them in this process. Two by default: since the tests reuse worker
# processes (rlhf.utils.process_pool) a serial run leaves one of 2 cores idle a third of the time, and two
# workers took 14 min 27 s against 16 min 24 s serially on the 2-core CI machine (warm caches).
WORKERS ?= 2
XDIST := $(if $(filter-out 0,$(WORKERS)),-n $(WORKERS) --dist loadgroup --no-loadscope-reorder)

test: setup
	$(ENV) $(PY) -m pytest $(XDIST) -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup
	$(ENV) $(PY) -m pytest $(XDIST) -m "not gpu" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check rlhf tests benchmarks
	$(VENV)/bin/ruff format --check rlhf tests benchmarks

bench: setup
	$(ENV) $(PY) -m benchmarks.run_all

# memory of every actor over a few hundred tiny PPO steps (~10 min; kept out of `make bench`)
soak: setup
	$(ENV) $(PY) -m benchmarks.soak $(ARGS)

clean:
	rm -rf outputs .pytest_cache
