# The README's two commands. Each creates (or reuses) .venv with Python 3.11
# and installs the project with the extras it needs before running.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[serving,examples,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m ruff check tfbn serving tests examples
	$(PY) -m pytest

bench: $(STAMP)
	$(VENV)/bin/tfbn bench

# On a machine with GPUs and TensorFlow's GPU build: PASS/FAIL table + reports/gpu-check.json.
gpu-check: $(STAMP)
	mkdir -p reports
	$(VENV)/bin/tfbn gpu-check --json reports/gpu-check.json

clean:
	rm -rf $(VENV) build *.egg-info reports
