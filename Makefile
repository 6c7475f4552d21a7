# The two commands of the README: `make demo` and `make test`. Both create .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: install demo test bench bench-gpu clean

install: $(STAMP)

# torch==2.13.0 goes in first and alone: resolving torch as a dependency of deepspeed or
# transformers on a GPU-less machine would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/langcell demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

# On a GPU host: the base recipe per ZeRO stage on all local GPUs (BENCHMARKS.md "GPU").
bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.bench_gpu

clean:
	rm -rf $(VENV) $(DEMO_OUT)
