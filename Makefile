# flowers_jax: `make demo` trains a small model on a synthetic Flowers102-format set (CPU, ~2 min),
# `make test` runs the test suite. Both create .venv and install the package on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := runs/demo_data
DEMO_DIR := runs/demo

.PHONY: install demo test test-all clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo ">> creating $(VENV) and installing flowers_jax[torch,test] (first time: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[torch,test]'
	@touch $(STAMP)

$(DEMO_DATA)/setid.mat: | $(STAMP)
	$(PY) scripts/make_fake_flowers.py $(DEMO_DATA) --num-classes 10 --per-class 60 --image-size 48 --seed 0

demo: $(STAMP) $(DEMO_DATA)/setid.mat
	rm -rf $(DEMO_DIR)
	$(PY) -m flowers_jax.main --config configs/demo.py --workdir $(DEMO_DIR) \
	    --config.data.dir=$(DEMO_DATA)
	@echo ">> demo done: results in $(DEMO_DIR)/results.json, curves in $(DEMO_DIR)/curves.png"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

test-all: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile -m ''

# CPU benchmark at small sizes: every model, JAX vs torch float32 training steps side by side
# (5-8 minutes on 2 busy cores, mostly XLA compiles; add `--dtypes float32,bfloat16` for the JAX
# bf16 rows). The GPU run is scripts/gpu_bench.sh; results in docs/benchmarks.md.
.PHONY: bench
bench: $(STAMP)
	$(PY) scripts/benchmark.py train --batch 8 --size 64 --steps 5 --warmup 1 --dtypes float32 \
	    --out runs/bench/train_cpu.json

clean:
	rm -rf runs .pytest_cache
