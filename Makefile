# Two entry points: `make serve` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: compare build test bench-quantization clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

IMAGE ?= $(shell $(BIN)/python -c 'import importlib.resources as r; print(r.files("skimage.data") / "chelsea.png")' 2>/dev/null)

compare: $(STAMP)
	$(BIN)/leanvgg compare $(IMAGE) $(ARGS)

build: $(STAMP)
	$(BIN)/leanvgg build $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

bench-quantization: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/quantization_backends.py $(ARGS)

clean:
	rm -rf $(VENV) test-artifacts
