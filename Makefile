# Set-up and the two commands of the README. Everything installs into .venv (created on first use).
# TORCH_SPEC pins the torch build; on a CPU-only machine `torch==2.13.0` resolves to the CPU wheel.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test install

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python examples/main_demo.py

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider
