# Two commands on a fresh machine (Python 3.8–3.11 with venv):
#   make demo   set everything up, then run `mxvision demo`
#   make test   set everything up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test figures clean

$(BIN)/.mxvision-installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test,onnx]'
	touch $@

setup: $(BIN)/.mxvision-installed

demo: setup
	$(BIN)/mxvision demo --out mxvision-demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# rerun the commands behind README's results table and rewrite it (JSRT row: needs ../shared)
figures: setup
	$(BIN)/python bench/figures.py --write

clean:
	rm -rf $(VENV) mxvision-demo build *.egg-info
