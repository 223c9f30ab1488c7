# make train  - set up .venv if needed, then train the default (ARGS="..." passes Hydra overrides)
# make test   - set up .venv if needed, then run the test suite (fast tests; `make test-slow` for the rest)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-slow lint bench

$(STAMP): requirements.txt setup.cfg
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	$(VENV)/bin/pip install --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) -m xnorpp.bench $(ARGS)
