# The README's set-up commands. Each target creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: test test-slow demo lint notebooks bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The suite but the tests marked slow (notebooks, benchmark runs), which it names at the
# end; `make test-slow` runs those. CI (.ci/run) runs both.
test: $(BIN)/python
	$(PIP) -e ".[test,flax]"
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile --slow=exclude

test-slow: $(BIN)/python
	$(PIP) -e ".[test,flax]"
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist load --slow=only

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
