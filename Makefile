# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv, installs
# torch first (this pin takes a local CPU wheel where one is provided, the regular CUDA build
# from PyPI elsewhere), then llmrl with its test extras, within the tested versions of constraints.txt.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m llmrl.demo

test: setup
	$(PY) -m pytest -q -n auto --dist worksteal

clean:
	rm -rf $(VENV) outputs
