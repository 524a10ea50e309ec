# Two commands on a fresh machine (Python 3.8–3.13 with venv; PYTHON=python3.13 make demo picks one):
#   make demo   set everything up, then run `mxvision demo`
#   make test   set everything up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY_MINOR := $(shell $(PYTHON) -c 'import sys; print(sys.version_info[1])')
# MXNet 1.9.1's metadata asks for numpy<2, which has no wheel for Python 3.13: there MXNet goes in
# first without its dependencies (then its other two by hand), and setup.py leaves it out.
MXNET_NO_DEPS := $(shell [ $(PY_MINOR) -ge 13 ] && echo yes)
# The parity suite's torch: the CPU wheel of 2.13.0 lies on this machine kind's disk for 3.11 only.
PARITY := $(shell [ $(PY_MINOR) -eq 11 ] && echo yes)

.PHONY: setup setup-parity parity-torchvision demo test figures clean

$(BIN)/.mxvision-installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
ifeq ($(MXNET_NO_DEPS),yes)
	@echo "Python 3.$(PY_MINOR): installing MXNet 1.9.1 with --no-deps (its numpy<2 pin has no wheel here; mxvision.runtime.compat makes it run on NumPy 2; pip check reports the override)"
	$(BIN)/python -m pip install --quiet --no-deps mxnet==1.9.1
	$(BIN)/python -m pip install --quiet 'graphviz>=0.8.1,<0.9' requests
endif
	$(BIN)/python -m pip install --quiet -e '.[test,onnx,serve]'
	touch $@

# The parity suite (tests/parity) against torchxrayvision itself: the CPU torch 2.13.0 (extra
# `parity`), then torchxrayvision without its dependencies, as its torchvision would pull a CUDA
# torch of several GB (what it imports is in the extra). Only `make test` needs it, not the demo.
$(BIN)/.parity-installed: $(BIN)/.mxvision-installed
ifeq ($(PARITY),yes)
	$(BIN)/python -m pip install --quiet -e '.[test,onnx,serve,parity]'
	$(BIN)/python -m pip install --quiet --no-deps torchxrayvision==1.5.7
else
	@echo "Python 3.$(PY_MINOR): no parity suite (its CPU torch 2.13.0 is on this machine kind for Python 3.11 only; tests/parity skips)"
endif
	touch $@

# parity-torchvision (local only, not in CI): tests/parity in a second venv with the REAL torchvision
# 0.29.1 instead of tests/parity/torchvision_stand_in.py, whose test_torchvision_stand_in.py then
# checks the stand-in against it (same modules, bitwise weights from one seed, same outputs). The
# torchvision wheel pins torch==2.14.1, of which this machine has only the CUDA build (it runs on the
# CPU; the venv is about 6.5 GB), hence its own venv; the parity extra's other packages are named
# here because the extra pins the CPU torch 2.13.0. Python 3.11: the local wheels are cp311. Each
# suite in a process of its own, as in `make test` (MXNet's memory pool keeps what a process used).
TV_PYTHON ?= python3.11
TV_VENV ?= .venv-torchvision
$(TV_VENV)/bin/.parity-torchvision-installed: setup.py pyproject.toml
	$(TV_PYTHON) -m venv $(TV_VENV)
	$(TV_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(TV_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(TV_VENV)/bin/python -m pip install --quiet -e '.[test]' 'scikit-image<0.25' imageio pandas requests
	$(TV_VENV)/bin/python -m pip install --quiet --no-deps torchxrayvision==1.5.7
	touch $@

parity-torchvision: $(TV_VENV)/bin/.parity-torchvision-installed
	$(call parity_suites,$(TV_VENV)/bin/python)

setup: $(BIN)/.mxvision-installed

setup-parity: $(BIN)/.parity-installed

demo: setup
	$(BIN)/mxvision demo --out mxvision-demo

# The parity suites run one file per process: MXNet's memory pool keeps what a process once
# used, and the segmentation, autoencoder and ensemble suites together grew one pytest past
# 13 GB (OOM-killed in a CI rehearsal); a process per file bounds it by the largest suite.
# Exit status 5 is pytest's "no tests collected": a suite that skips as a whole (no torch on this
# Python; under CI=true on 3.11 a missing torch fails instead, with status 2).
parity_suites = for suite in tests/parity/test_*.py; do $(1) -m pytest -q -rs -p no:cacheprovider $$suite; \
	status=$$?; if [ $$status -ne 0 ] && [ $$status -ne 5 ]; then exit $$status; fi; done

# -rs: every skip and its reason; --durations: the slowest tests, for CI's time budget;
# PYTEST_ARGS: more pytest arguments (CI leaves two suites out on its second Python: .ci/run)
PYTEST_ARGS ?=
test: setup setup-parity
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider --durations=30 tests --ignore=tests/parity $(PYTEST_ARGS)
	$(call parity_suites,$(BIN)/python)

# rerun the commands behind README's results table and rewrite it (JSRT row: needs ../shared)
figures: setup
	$(BIN)/python bench/figures.py --write

clean:
	rm -rf $(VENV) mxvision-demo build *.egg-info
