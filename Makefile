# `make run`: the whole DVC pipeline on the embedded default.  `make test`: the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: run test test-all install

$(BIN)/cellseg: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1 || $(BIN)/pip install --quiet torch torchvision
	$(BIN)/pip install --quiet -e '.[test]' -c constraints.txt
	touch $@

install: $(BIN)/cellseg

run: install
	dvc repro

test: install
	pytest -q -m "not slow" -n auto --durations=15

test-all: install
	pytest -q -n auto
