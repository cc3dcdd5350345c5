# make demo : build or load the merge_state and ragged batch prefill kernels, show where they are
#             cached and how long that took, then (with a GPU) check them against a float32 reference
# make test : the test suite (on CPU; GPU tests are skipped, with the reason, without a GPU), with a
#             throwaway kernel cache
#
# Both create .venv on first use and install the package into it (editable, with the test and bench
# extras: the tests render benchmarks/plot.py's charts) once;
# the stamp file is refreshed when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -e '.[test,bench]'
	touch $@

demo: $(STAMP)
	FLASHINFER_JIT_CACHE_DIR="$${FLASHINFER_JIT_CACHE_DIR:-$(CURDIR)/cache}" $(VENV)/bin/python examples/quickstart.py

test: $(STAMP)
	@cache_dir="$$(mktemp -d)"; \
	echo "kernel cache for this run: $$cache_dir"; \
	FLASHINFER_JIT_CACHE_DIR="$$cache_dir/cache" $(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS); \
	status=$$?; rm -rf "$$cache_dir"; exit $$status

clean-venv:
	rm -rf $(VENV)
