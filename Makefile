# Two entry points: `make demo` (the main job, offline, on the bundled digits) and `make test` (the test suite).
# Both create .venv and install into it first. TORCH_PIN installs torch before anything else can pull another build
# (the CPU build where the package index serves it, as CI's does); `make test TORCH_PIN=torch` takes the newest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
BENCH_DEVICE ?= cpu

.PHONY: install test demo lint bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev,conversion]"
	touch $@

test: install
	$(PY) -m pytest -q

# Pretrain, sample, probe and fine-tune a tiny Image GPT on the bundled digits; prints where every artifact is.
demo: install
	$(PY) examples/demo.py --output_dir demo_output $(DEMO_ARGS)

# Side by side with transformers' ImageGPT on this machine; rewrites this device's section of benchmarks/RESULTS.md.
bench: install
	$(PY) benchmarks/bench.py --device $(BENCH_DEVICE) --output benchmarks/RESULTS.md $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
