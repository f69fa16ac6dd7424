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

# The cross-version tests (a folder saved under one transformers loads under the other): the test python with
# transformers 5.17 (the GPU machine's version) and its huggingface_hub put in front by a wrapper script.
CROSS := $(VENV)/cross
$(CROSS)/python: $(BIN)/.installed
	rm -rf $(CROSS)
	$(BIN)/pip install -q --target $(CROSS)/site --no-deps "transformers==5.17.0" "huggingface_hub==1.33.0"
	$(BIN)/pip install -q --target $(CROSS)/site httpx
	printf '#!/bin/sh\nhere=$$(cd "$$(dirname "$$0")" && pwd)\nPYTHONPATH="$$here/site$${PYTHONPATH:+:$$PYTHONPATH}" exec "$$here/../bin/python" "$$@"\n' > $@
	chmod +x $@

demo: $(BIN)/.installed
	$(BIN)/python examples/main_demo.py

test: $(BIN)/.installed $(CROSS)/python
	MULTIMODAL_MAMBA_CROSS_PYTHON="$${MULTIMODAL_MAMBA_CROSS_PYTHON:-$(abspath $(CROSS)/python)}" \
		$(BIN)/python -m pytest -q -p no:cacheprovider
