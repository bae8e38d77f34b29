# make test  : set up .venv on first use (pinned requirements + this package), then run the whole suite
# make bench : same set-up, then the benchmark comparison (GPU if there is one, else CPU)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
PKG    := $(VENV)/.pkg-installed
# nvcc lives here on the dev/CI machines; torch would otherwise guess /usr/local.
ifeq ($(origin CUDA_HOME), undefined)
  ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
    export CUDA_HOME := /usr/local/cuda
  endif
endif
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test bench install clean

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

$(PKG): $(DEPS) $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | tee $(VENV)/build.log | grep -E "fused_fpn setup|error|Error|Successfully" || true
	$(PY) -c "import fused_fpn, sys; print('fused_fpn backends:', fused_fpn.available_backends()); sys.exit(0 if fused_fpn.extension_loaded() else 1)"
	touch $@

install: $(PKG)

test: $(PKG)
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: $(PKG)
	$(PY) -m pytest benchmarks $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fused_fpn/_C*.so
