# Common commands. `make test` and `make run` do their own set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test run quick bench lint format clean

setup:
	bash scripts/setup_env.sh

test: setup
	bash scripts/run_tests.sh

run: setup
	$(VENV)/bin/reclora run

quick: setup
	$(VENV)/bin/reclora run --quick

bench: setup
	$(PY) benchmarks/bench_lora.py

lint:
	$(VENV)/bin/ruff check .

format:
	$(VENV)/bin/ruff format .

clean:
	rm -rf build *.egg-info reclora_kernels/_C*.so
