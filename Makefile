# kanc: two entry points on a fresh machine.
#   make demo   converts the example model shipped in examples/ and prints its fidelity table
#   make test   runs the test suite (CPU; Triton kernels under TRITON_INTERPRET=1)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kanc-installed
ZOO_STAMP := $(VENV)/.kanc-zoo-installed

.PHONY: test test-cpu test-kernels demo lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

# The third-party model libraries of the coverage tests (extra "zoo"), with torch held at the installed version.
# A torchvision whose import fails beside this torch (the registry's CUDA build beside the CPU one) is moved aside,
# where only the coverage harness looks: benchmarks/families/tvshim.py.
$(ZOO_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -e ".[zoo]" "torch==$$($(PY) -c "import torch; print(torch.__version__.split('+')[0])")"
	$(PY) benchmarks/families/tvshim.py --relocate
	touch $(ZOO_STAMP)

test: test-cpu test-kernels

# Conversion, layers, CLI, runtime: the PyTorch reference path.
test-cpu: $(STAMP) $(ZOO_STAMP)
	$(PY) -m pytest -q tests --ignore=tests/codegen

# Triton kernels on the CPU: the interpreter must be set before triton is imported.
test-kernels: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/codegen

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check kanc tests examples benchmarks
	$(VENV)/bin/ruff format --check kanc tests examples benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format kanc tests examples benchmarks
	$(VENV)/bin/ruff check --fix kanc tests examples benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
