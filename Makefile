# flowers_jax: `make demo` trains a small model on a synthetic Flowers102-format set (CPU, ~2 min),
# `make test` runs the test suite. Both create .venv and install the package on first use.
# Another Python: `make test PYTHON=python3.12 VENV=.venv-py3.12` (each Python its own venv).
# `make test-matrix` (what CI runs) tests every stack in MATRIX, each in .venv-pyX.Y: the oldest
# supported Python and the newest, with what pip resolves for each.
PYTHON ?= python3
VENV ?= .venv
MATRIX ?= 3.11 3.12
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := runs/demo_data
DEMO_DIR := runs/demo

.PHONY: install demo test test-all test-matrix clean

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
	@$(PY) scripts/stack_versions.py
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

test-all: $(STAMP)
	@$(PY) scripts/stack_versions.py
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile -m ''

# Every stack is tested even when an earlier one fails; the summary gives each one's time.
test-matrix:
	@failed=""; summary=""; \
	for v in $(MATRIX); do \
	  py=$$(scripts/find_python.sh $$v) || { failed="$$failed $$v"; continue; }; \
	  echo ">> test stack: Python $$v ($$py), venv .venv-py$$v"; \
	  t0=$$(date +%s); \
	  if $(MAKE) --no-print-directory test PYTHON=$$py VENV=.venv-py$$v; then r=passed; \
	  else r=FAILED; failed="$$failed $$v"; fi; \
	  summary="$$summary\n   Python $$v: $$r in $$(( $$(date +%s) - t0 )) s (install included)"; \
	done; \
	printf ">> test-matrix:$$summary\n"; \
	if [ -n "$$failed" ]; then echo ">> test-matrix: failed on Python$$failed"; exit 1; fi

# CPU benchmark at small sizes: every model, JAX vs torch float32 training steps side by side
# (5-8 minutes on 2 busy cores, mostly XLA compiles; add `--dtypes float32,bfloat16` for the JAX
# bf16 rows). The GPU run is scripts/gpu_bench.sh; results in docs/benchmarks.md.
.PHONY: bench
bench: $(STAMP)
	$(PY) scripts/benchmark.py train --batch 8 --size 64 --steps 5 --warmup 1 --dtypes float32 \
	    --out runs/bench/train_cpu.json

clean:
	rm -rf runs .pytest_cache .venv-py*
