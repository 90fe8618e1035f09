# The README's set-up commands. Each target creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: test demo lint notebooks bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

test: $(BIN)/python
	$(PIP) -e ".[test,flax]"
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile

demo: $(BIN)/python
	$(PIP) -e ".[demo]"
	$(BIN)/python -m examples.rbm_digits

# Re-run notebooks in place (all of them, or NOTEBOOKS=notebooks/01_quickstart.ipynb).
NOTEBOOKS ?= $(sort $(wildcard notebooks/*.ipynb))
notebooks: $(BIN)/python
	$(PIP) -e ".[notebooks]"
	$(BIN)/jupyter execute --inplace $(NOTEBOOKS)

lint: $(BIN)/python
	$(PIP) -e ".[dev]"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright

bench: $(BIN)/python
	$(PIP) -e ".[test]"
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/train_step.py --model gpt
	$(BIN)/python benchmarks/train_step.py --devices 8
	$(BIN)/python benchmarks/leaf_cost.py
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/accumulation_memory.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
