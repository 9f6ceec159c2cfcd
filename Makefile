# Two entry points: `make serve` (the main job: the dashboard) and `make test`.
# Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve compare build test test-quick bench-quantization bench-accuracy bench-load bench-peers bench-fidelity bench-fast-accuracy bench-tune bench-startup bench-memory bench-cpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,export]'
	touch $(STAMP)

IMAGE ?= $(shell $(BIN)/python -c 'import importlib.resources as r; print(r.files("skimage.data") / "chelsea.png")' 2>/dev/null)

# The dashboard on http://127.0.0.1:8000/ (weights `auto`: ImageNet when reachable, else random).
serve: $(STAMP)
	$(BIN)/leanvgg serve $(ARGS)

compare: $(STAMP)
	$(BIN)/leanvgg compare $(IMAGE) $(ARGS)

build: $(STAMP)
	$(BIN)/leanvgg build $(ARGS)

# A worker per core (pytest-xdist, at most 4), each running whole modules, which share what
# they build (tests/conftest.py). `ARGS="-n 0"` runs them in this process, one by one.
PARALLEL := -n auto --dist loadscope --no-loadscope-reorder

test: $(STAMP)
	$(BIN)/python -m pytest $(PARALLEL) $(ARGS)

# The quick subset for iterating (under 3 minutes): everything not marked slow.
test-quick: $(STAMP)
	$(BIN)/python -m pytest $(PARALLEL) -m "not slow" $(ARGS)

bench-quantization: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/quantization_backends.py $(ARGS)

bench-accuracy: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/accuracy_digits.py $(ARGS)

# 16 clients for 60 s against a real server on 127.0.0.1 (results in benchmarks/results/).
bench-load: $(STAMP)
	$(BIN)/python benchmarks/load_test.py $(ARGS)

# leanvgg's variants against OpenVINO, ONNX Runtime and torch.compile bf16, in one run.
bench-peers: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench,export]'
	$(BIN)/python benchmarks/peers.py $(ARGS)

# What depends on the CPU kind, in one go, each report named after it (amx, avx512-avxvnni,
# avx512, avx2: leanvgg.machine.cpu_kind): the peers, the runtimes' top-1 agreement (with its
# bf16 gate) and the channel alignments; then the peers' README tables. 16 min on a warm cache;
# a cold one adds every variant's build and the digits model's training (974 s on an EPYC).
bench-cpu: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench,export]'
	KIND=$$($(BIN)/python -c 'from leanvgg.machine import cpu_kind; print(cpu_kind())') && \
	$(BIN)/python benchmarks/peers.py --out benchmarks/results/peers-$$KIND && \
	$(BIN)/python benchmarks/runtime_fidelity.py --out benchmarks/results/runtime_fidelity-$$KIND.json && \
	$(BIN)/python benchmarks/channel_alignment.py --runs 80 --out benchmarks/results/channel_alignment-$$KIND.json && \
	$(BIN)/python benchmarks/peers.py --markdown --out benchmarks/results/peers-$$KIND

# Accuracy, top-1 agreement and logit error of the fast variants against FP32, and of each
# runtime (inductor, onnxruntime, openvino) against inductor.
bench-fidelity: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/fidelity.py $(ARGS)
	$(BIN)/python benchmarks/runtime_fidelity.py

# The fast variants' accuracy cost (turbo_svd's classifier SVD) on real digits, 95 % intervals.
bench-fast-accuracy: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/fast_variants_digits.py $(ARGS)

# leanvgg tune's search on the digits-trained VGG-19 (Pareto front, sensitivity, choice).
bench-tune: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/tune_digits.py $(ARGS)

# The dashboard from an empty cache, then a warm one: start-up, uploads, first row, memory.
bench-startup: $(STAMP)
	$(BIN)/python benchmarks/startup.py $(ARGS)

# Memory against its floor after each variant and after N uploads; per-image decoding memory.
bench-memory: $(STAMP)
	$(BIN)/python benchmarks/memory.py $(ARGS)
	$(BIN)/python benchmarks/decode_memory.py

clean:
	rm -rf $(VENV) test-artifacts
