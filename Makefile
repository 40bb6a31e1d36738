# Two entry points for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install
install: $(BIN)/thyroid-cad

$(BIN)/thyroid-cad: pyproject.toml
	$(PYTHON) -m pip install --quiet --disable-pip-version-check uv
	$(PYTHON) -m uv venv --quiet --allow-existing --python 3.11 $(VENV)
	$(PYTHON) -m uv pip install --quiet --python $(VENV)/bin/python -e '.[train,serve,score,spark,dev]'
	touch $@

# Phantom data -> train -> MLflow -> ONNX -> registry -> champion -> service (foreground),
# on port PORT (make demo PORT=8001).
PORT ?= 8000
demo: install
	PORT=$(PORT) bash scripts/demo.sh

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest --durations=15
