# kanc: two entry points on a fresh machine.
#   make demo   converts the example model shipped in examples/ and prints its fidelity table
#   make test   runs every test tier (CPU; Triton kernels under TRITON_INTERPRET=1) and reports each
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kanc-installed
LOGS := build/test-logs
SHELL := bash

# Test tiers: `make test` runs every TEST_<tier>, even after one fails, then prints one line per tier; each tier
# also runs alone as `make test-<tier>`. A new tier is a TEST_<tier> line and a word in TIERS.
TIERS := cpu kernels
# Conversion, layers, CLI, runtime: the PyTorch reference path.
TEST_cpu = $(PY) -m pytest -q tests --ignore=tests/codegen
# Triton kernels on the CPU: the interpreter must be set before triton is imported.
TEST_kernels = TRITON_INTERPRET=1 $(PY) -m pytest -q tests/codegen
# System commands the tests run, as command:Debian-package (the report test opens report.html in chromium).
SYSTEM_DEPS := chromium:chromium

.PHONY: test $(TIERS:%=test-%) system-deps demo gpu-check lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

# Installs what SYSTEM_DEPS lacks with apt-get when root; otherwise stops, in one line, before any test runs.
system-deps:
	@missing=""; \
	for dep in $(SYSTEM_DEPS); do command -v "$${dep%%:*}" >/dev/null || missing="$$missing $${dep#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages the tests need:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
		echo "make test needs Debian packages:$$missing; install them first (sudo apt-get install$$missing)" >&2; \
		exit 1; \
	fi

test: $(STAMP) system-deps
	@mkdir -p $(LOGS); failed=""; \
	$(foreach t,$(TIERS),echo "== tier $(t)"; $(TEST_$(t)) 2>&1 | tee $(LOGS)/$(t).log; \
		[ "$${PIPESTATUS[0]}" = 0 ] || failed="$$failed $(t)";) \
	echo "== make test: one line per tier (logs in $(LOGS)/)"; \
	$(foreach t,$(TIERS),printf '%-8s %s\n' $(t) "$$(tail -n 1 $(LOGS)/$(t).log)";) \
	if [ -n "$$failed" ]; then echo "FAILED tiers:$$failed"; exit 1; fi

$(TIERS:%=test-%): test-%: $(STAMP)
	$(TEST_$*)

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
