# The README's commands. Each creates (or reuses) a virtual environment with
# Python 3.11 and installs the project with the extras it needs before running.
#
#   make test         lint, the whole suite on the newest versions (.venv), then the suite
#                     without the tests marked slow on the oldest pinned ones (.venv-oldest):
#                     under 15 minutes on 2 cores
#   make test-ci      make test, then the slow tests at the oldest end too: the whole suite at
#                     both ends of the supported range, as CI runs it (.ci/run)
#   make test-newest  the whole suite on the newest versions only
#   make test-oldest  the whole suite on the oldest supported versions (.ci/constraints-oldest.txt)
#   make test-fast    the suite without the tests marked slow, newest versions
#   make lint         ruff check and ruff format --check
#   make format       ruff format and the import-order fixes
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OLD_VENV  ?= .venv-oldest
OLD_PY    := $(OLD_VENV)/bin/python
OLD_STAMP := $(OLD_VENV)/.installed
CONSTRAINTS_OLDEST := .ci/constraints-oldest.txt
SOURCES := tfbn serving tests examples
# Test processes (pytest-xdist; tests grouped by file, so a module's fixtures stay in one
# process): on 2 cores one end of the suite took about 6 minutes instead of 10-11
# (measured on one machine; 8 on a slower one).
PYTEST_WORKERS ?= 2
PYTEST := -m pytest -n $(PYTEST_WORKERS) --dist loadfile
# prints the versions a test run uses: $(PY) $(VERSIONS) LABEL
VERSIONS := -c "import sys, tensorflow as tf, keras, numpy, google.protobuf as pb; print(sys.argv[1], 'end: python', sys.version.split()[0], 'tensorflow', tf.__version__, 'keras', keras.__version__, 'numpy', numpy.__version__, 'protobuf', pb.__version__)"

.PHONY: demo test test-ci test-newest test-oldest test-oldest-fast test-oldest-slow test-fast lint format bench clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[serving,examples,dev]"
	touch $(STAMP)

$(OLD_PY):
	$(PYTHON) -m venv $(OLD_VENV) || python3 -m venv $(OLD_VENV)

$(OLD_STAMP): $(OLD_PY) setup.cfg pyproject.toml $(CONSTRAINTS_OLDEST)
	$(OLD_PY) -m pip install --upgrade pip
	$(OLD_PY) -m pip install -c $(CONSTRAINTS_OLDEST) -e ".[serving,examples,dev]"
	$(OLD_PY) -m pip check
	touch $(OLD_STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: test-newest test-oldest-fast

test-ci: test test-oldest-slow

test-newest: $(STAMP)
	$(PY) $(VERSIONS) newest
	$(PY) -m ruff check $(SOURCES)
	$(PY) -m ruff format --check $(SOURCES)
	$(PY) $(PYTEST)

# The oldest end in two halves: `make test` runs the first, CI (test-ci) and test-oldest
# both. The tests that build their own virtual environments (marker `venv`) run once, above.
test-oldest: test-oldest-fast test-oldest-slow

test-oldest-fast: $(OLD_STAMP)
	$(OLD_PY) $(VERSIONS) oldest
	$(OLD_PY) $(PYTEST) -m "not venv and not slow"

test-oldest-slow: $(OLD_STAMP)
	$(OLD_PY) $(PYTEST) -m "slow and not venv"

test-fast: $(STAMP)
	$(PY) $(PYTEST) -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check $(SOURCES)
	$(PY) -m ruff format --check $(SOURCES)

format: $(STAMP)
	$(PY) -m ruff check --select I --fix $(SOURCES)
	$(PY) -m ruff format $(SOURCES)

bench: $(STAMP)
	$(VENV)/bin/tfbn bench

# On a machine with GPUs and TensorFlow's GPU build: PASS/FAIL table + reports/gpu-check.json.
gpu-check: $(STAMP)
	mkdir -p reports
	$(VENV)/bin/tfbn gpu-check --json reports/gpu-check.json

clean:
	rm -rf $(VENV) $(OLD_VENV) build dist *.egg-info reports
