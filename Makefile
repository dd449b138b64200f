# Two commands on a fresh machine with only Python 3: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch: a bare `torch` requirement would pull the multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test test-fast bench venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)

venv: $(BIN)/python

demo: venv
	$(BIN)/python -m pip install --quiet -e '.[cli]'
	$(BIN)/optcraft compare

test: venv
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pytest -q -m 'not slow'

bench: venv
	$(BIN)/python -m pip install --quiet -e '.[cli]'
	$(BIN)/optcraft bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
