# make test  : set up .venv on first use (pinned requirements + this package), then run the whole suite
# make bench : same set-up, then the benchmark comparison (GPU if there is one, else CPU)
# make test-compat : the whole suite again, against the GPU machines' torch / torchvision / triton
#              (requirements-compat.txt) in .venv-compat, on a copy of the work tree in build/compat-src
#              (the package builds in place, and a build against another torch must not replace
#              fused_fpn/_C here); the CUDA kernels for sm_90 only
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

COMPAT_VENV := .venv-compat
COMPAT_DEPS := $(COMPAT_VENV)/.deps-installed
COMPAT_SRC  := build/compat-src

.PHONY: test bench install clean test-compat

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

$(COMPAT_DEPS): requirements-compat.txt
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -r requirements-compat.txt
	touch $@

test-compat: $(COMPAT_DEPS)
	rm -rf $(COMPAT_SRC) && mkdir -p $(COMPAT_SRC)
	git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(COMPAT_SRC)
	cd $(COMPAT_SRC) && FUSED_FPN_CUDA_ARCHS=90 $(CURDIR)/$(COMPAT_VENV)/bin/python -m pip install --no-build-isolation \
		--no-deps -v -e . > build.log 2>&1 || { tail -40 build.log; exit 1; }
	cd $(COMPAT_SRC) && $(CURDIR)/$(COMPAT_VENV)/bin/python -c "import fused_fpn, torch, triton, sys; \
		print('compat: torch', torch.__version__, 'triton', triton.__version__, 'backends', fused_fpn.available_backends()); \
		sys.exit(0 if fused_fpn.extension_loaded() else 1)"
	cd $(COMPAT_SRC) && FUSED_FPN_CUDA_ARCHS=90 $(CURDIR)/$(COMPAT_VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

bench: $(PKG)
	$(PY) -m pytest benchmarks $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fused_fpn/_C*.so $(PKG)
