# Two commands on a fresh machine (Python 3.8–3.11 with venv):
#   make demo   set everything up, then run `mxvision demo`
#   make test   set everything up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-parity demo test figures clean

$(BIN)/.mxvision-installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test,onnx]'
	touch $@

# The parity suite (tests/parity) against torchxrayvision itself: the CPU torch 2.13.0 (extra
# `parity`), then torchxrayvision without its dependencies, as its torchvision would pull a CUDA
# torch of several GB (what it imports is in the extra). Only `make test` needs it, not the demo.
$(BIN)/.parity-installed: $(BIN)/.mxvision-installed
	$(BIN)/python -m pip install --quiet -e '.[test,onnx,parity]'
	$(BIN)/python -m pip install --quiet --no-deps torchxrayvision==1.5.7
	touch $@

setup: $(BIN)/.mxvision-installed

setup-parity: $(BIN)/.parity-installed

demo: setup
	$(BIN)/mxvision demo --out mxvision-demo

test: setup setup-parity
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider tests  # -rs: every skip and its reason

# rerun the commands behind README's results table and rewrite it (JSRT row: needs ../shared)
figures: setup
	$(BIN)/python bench/figures.py --write

clean:
	rm -rf $(VENV) mxvision-demo build *.egg-info
