# Two entry points for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := .thyroid-cad/demo-data

.PHONY: demo test lint install
install: $(BIN)/thyroid-cad

$(BIN)/thyroid-cad: pyproject.toml
	$(PYTHON) -m pip install --quiet --disable-pip-version-check uv
	$(PYTHON) -m uv venv --quiet --allow-existing --python 3.11 $(VENV)
	VIRTUAL_ENV=$(VENV) $(PYTHON) -m uv pip install --quiet -e '.[train,serve,dev]'
	touch $@

# Synthetic phantom -> small model trained and logged to the local MLflow store.
demo: install
	rm -rf $(DEMO)
	$(BIN)/thyroid-cad demo-data $(DEMO) --per-class 150
	$(BIN)/thyroid-cad train --data $(DEMO) --backbone tiny --epochs 15 --image-size 64 --batch-size 16
	@echo "Runs are in .thyroid-cad/mlflow.db; browse them with:"
	@echo "  $(BIN)/mlflow ui --backend-store-uri sqlite:///.thyroid-cad/mlflow.db"

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest --durations=15
