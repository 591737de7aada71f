# Every target sets itself up: a fresh machine needs nothing but python3.
# On these machines `pip install torch==2.13.0` takes a CPU wheel from local disk; a bare `torch`
# requirement would pull a multi-GB CUDA build, so torch is installed first and pinned here only.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: demo test test-all lint default-model baseline clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[hf,corpora,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

# Re-trains the shipped default model (about an hour on 2 CPU cores with bf16) and its AR baseline.
default-model: $(STAMP)
	$(BIN)/python scripts/train_default.py

clean:
	rm -rf $(VENV) runs .pytest_cache
