# kanc: two entry points on a fresh machine.
#   make demo   converts the example model shipped in examples/ and prints its fidelity table
#   make test   runs the test suite (CPU; Triton kernels under TRITON_INTERPRET=1)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kanc-installed

.PHONY: test test-cpu test-kernels demo gpu-check lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

test: test-cpu test-kernels

# Conversion, layers, CLI, runtime: the PyTorch reference path.
test-cpu: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/codegen

# Triton kernels on the CPU: the interpreter must be set before triton is imported.
test-kernels: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/codegen

demo: $(STAMP)
	$(PY) examples/demo.py

# On a machine with one H100/H200 (< 8 minutes): GPU tests with tuning off, the benchmarks at ViT-B shapes, every
# figure beside its target in benchmarks/results/. SMOKE=1: tiny shapes on the CPU interpreter (checks the script).
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check kanc tests examples benchmarks
	$(VENV)/bin/ruff format --check kanc tests examples benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format kanc tests examples benchmarks
	$(VENV)/bin/ruff check --fix kanc tests examples benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
